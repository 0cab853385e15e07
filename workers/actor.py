"""The Ray actor that runs one case: a thin shell around `workers.trainer.train`.

One actor per case, killed when the case ends (TensorFlow never gives GPU memory back).
TensorFlow is imported inside the actor only, after the thread pools are sized to the
CPUs Ray gave the case and memory growth is switched on. Training runs in a thread; the
driver collects its reports with `poll`, so the actor never touches storage.
"""

from __future__ import annotations

import os
import platform
import queue
import threading
import time
import traceback

from workers import logs


class CaseRunner:
    """Plain class (made remote by the driver with the case's resources)."""

    def __init__(self, case_id: str, num_cpus: float, num_gpus: float):
        self.case_id = case_id
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.reports: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.outcome: dict | None = None
        self.info: dict = {}
        logs.start_capture()  # before TensorFlow: the case's own output goes to RUN/logs, not the terminal
        self.log_offset = logs.output_offset()

    def start(self, settings_json: dict, data, resume: bytes | None, checkpoint_every_steps: int) -> dict:
        """Set up TensorFlow for this process and start training in a thread; return device info
        (and, under "log", the case's output so far)."""
        self.log_offset = logs.output_offset()  # the case's output starts here
        self.info = self._setup_tensorflow()
        from workers import settings as settings_module

        settings = settings_module.from_json(settings_json)
        self.thread = threading.Thread(target=self._run, args=(settings, data, resume, checkpoint_every_steps), daemon=True)
        self.thread.start()
        return {**self.info, "log": self._new_output()}

    def _new_output(self) -> str:
        text, self.log_offset = logs.case_output_since(self.log_offset)
        return text

    def _run(self, settings, data, resume, checkpoint_every_steps):
        from workers.trainer import train

        try:
            self.outcome = {"ok": True, **train(settings, data, self.reports.put, resume=resume,
                                                checkpoint_every_steps=checkpoint_every_steps)}
        except BaseException as error:  # reported to the driver, which classifies it
            self.outcome = {"ok": False, "error_type": type(error).__name__, "error": first_line(error),
                            "traceback": traceback.format_exc()[-4000:], "error_class": classify_exception(error)}
        finally:
            self.reports.put(None)  # end marker

    def poll(self, timeout: float = 1.0) -> dict:
        """Reports produced since the last poll (waits up to `timeout` for the first one)."""
        reports, finished = [], False
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self.reports.get(timeout=max(remaining, 0.0)) if not reports else self.reports.get_nowait()
            except queue.Empty:
                break
            if item is None:
                finished = True
                break
            reports.append(item)
        return {"reports": reports, "finished": finished, "outcome": self.outcome if finished else None,
                "log": self._new_output()}

    def _setup_tensorflow(self) -> dict:
        import ray

        threads = max(1, int(round(self.num_cpus)))
        import tensorflow as tf

        # Before the first op: thread pools sized to the CPUs Ray gave us, memory growth on.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        assigned = [str(g) for g in ray.get_gpu_ids()]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        warning = None
        if gpus and len(gpus) != len(assigned):
            raise RuntimeError(f"TensorFlow sees {len(gpus)} GPUs but Ray assigned {assigned} (CUDA_VISIBLE_DEVICES={visible!r})")
        if assigned and not gpus:
            message = f"Ray assigned GPU {','.join(assigned)} but TensorFlow sees none"
            if tf.test.is_built_with_cuda():  # a GPU build that finds no GPU: driver/CUDA trouble on this node
                raise RuntimeError(f"{message} (CUDA_VISIBLE_DEVICES={visible!r}; is the NVIDIA driver visible?)")
            # A CPU-only TensorFlow (tensorflow-cpu): declared GPUs, as on a laptop or in tests.
            warning = f"{message}: this TensorFlow is a CPU-only build, the case runs on the CPU"
        gpu_names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            gpu_names.append(details.get("device_name", gpu.name))
        context = ray.get_runtime_context()
        return {
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": platform.node(),
            "pid": os.getpid(),
            "gpu_ids": assigned,
            "cuda_visible_devices": visible,
            "gpu_names": gpu_names,
            "tensorflow": tf.__version__,
            "ray": ray.__version__,
            "python": platform.python_version(),
            "threads": threads,
            "warning": warning,
        }


def first_line(error) -> str:
    """An error's first line (at most 500 characters), or its type when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


def classify_exception(error: BaseException) -> str:
    """Failure class of an exception raised while training (see jobs.storage.FAILURE_CLASSES)."""
    from workers.settings import SettingsError

    name = type(error).__name__
    text = str(error).lower()
    if name == "ResourceExhaustedError" or "out of memory" in text or isinstance(error, MemoryError):
        return "oom"
    if isinstance(error, SettingsError) or name in ("DataError", "SettingsError"):
        return "bad_settings"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    return "bug"
