"""The Ray actor that runs cases: a thin shell around `workers.trainer.train`.

One long-lived worker per resource slot (one GPU, or its CPUs) runs cases one after
another (README, Design notes: workers are reused): TensorFlow is imported and set up once per worker, with
its thread pools sized to the CPUs Ray gave it and memory growth on, and the traced steps
of a case structure are kept for the next case of the same structure (StepCache). The
driver replaces a worker after a failed case and recycles it after N cases or above a
memory limit. Each case trains in a thread; the driver collects its reports with `poll`,
so the worker never touches storage.

Why a thread, a queue and `poll` rather than a streaming generator method: the trainer
reports through a callback (it never imports Ray), so a generator would still need a
thread and a queue inside; `poll` batches every report since the last call into one
reply (a fast case makes hundreds), and `request_commit` can reach the worker while a
case runs (Ctrl-C commits before it stops).
"""

from __future__ import annotations

import os
import platform
import queue
import threading
import time
import traceback

from workers.errors import one_line as first_line
from workers import logs



class Worker:
    """Plain class (made remote by the driver with one slot's resources)."""

    def __init__(self, num_cpus: float, num_gpus: float):
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.reports: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.outcome: dict | None = None
        self.info: dict | None = None
        self.cache = None  # workers.steps.StepCache, made with TensorFlow
        self.commit_wanted = threading.Event()
        self.cases_run = 0
        self.started_at = time.time()
        logs.start_capture()  # before TensorFlow: a case's own output goes to RUN/logs, not the terminal
        self.log_offset = logs.output_offset()
        # TensorFlow is imported and set up from now on, while the driver gets the data and the
        # run directory ready: start() waits for it
        self.setup_error: BaseException | None = None
        self.setup = threading.Thread(target=self._set_up, daemon=True, name="bplab-setup")
        self.setup.start()

    def _set_up(self) -> None:
        try:
            began = time.time()
            info = self._setup_tensorflow()
            from workers.steps import StepCache

            self.cache = StepCache()
            self.info = {**info, "worker_started_at": self.started_at, "tensorflow_seconds": round(time.time() - began, 3)}
        except BaseException as error:  # raised again by start()
            self.setup_error = error

    def start(self, case_id: str, settings_json: dict, data, resume: bytes | None, checkpoint_every_steps: int,
              commit_every: float = 30.0) -> dict:
        """Start training a case in a thread; return device info (TensorFlow set up since the worker began)
        and, under "log", the worker's output since the case began."""
        self.log_offset = logs.output_offset()  # the case's output starts here
        if self.thread is not None:
            self.thread.join(timeout=30)  # the previous case has committed its end; let its thread finish
            assert not self.thread.is_alive(), "a worker runs one case at a time"
        self.setup.join()
        if self.setup_error is not None:
            raise self.setup_error
        from workers import settings as settings_module

        settings = settings_module.from_json(settings_json)
        self.reports, self.outcome = queue.Queue(), None
        self.commit_wanted.clear()
        self.cases_run += 1
        self.thread = threading.Thread(target=self._run, args=(settings, data, resume, checkpoint_every_steps,
                                                                 commit_every), daemon=True)
        self.thread.start()
        return {**self.info, "case_id": case_id, "worker_cases": self.cases_run, "log": self._new_output()}

    def _new_output(self) -> str:
        text, self.log_offset = logs.case_output_since(self.log_offset)
        return text

    def _run(self, settings, data, resume, checkpoint_every_steps, commit_every):
        from workers.trainer import train

        reports = self.reports
        try:
            self.outcome = {"ok": True, **train(settings, data, reports.put, resume=resume,
                                                checkpoint_every_steps=checkpoint_every_steps,
                                                commit_every=commit_every, cache=self.cache,
                                                commit_requested=self._take_commit_request)}
        except BaseException as error:  # reported to the driver, which classifies it
            self.outcome = {"ok": False, "error_type": type(error).__name__, "error": first_line(error),
                            "traceback": traceback.format_exc()[-4000:], "error_class": classify_exception(error)}
        finally:
            reports.put(None)  # end marker

    def _take_commit_request(self) -> bool:
        if self.commit_wanted.is_set():
            self.commit_wanted.clear()
            return True
        return False

    def request_commit(self) -> bool:
        """Ask the running case for a checkpoint at its next chunk boundary (Ctrl-C)."""
        self.commit_wanted.set()
        return self.thread is not None and self.thread.is_alive()

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
                "memory_mb": resident_mb(), "log": self._new_output()}

    def _setup_tensorflow(self) -> dict:
        import ray

        threads = max(1, int(round(self.num_cpus)))
        tf = import_tensorflow()

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


def import_tensorflow():
    """`import tensorflow`, without the Keras 3 import TensorFlow's __init__ makes on the side.

    TensorFlow imports `keras.src.optimizers` eagerly (to register Keras optimisers for
    SavedModel) and Keras brings scikit-learn with it: 2.5 s of the 6 s a worker spends importing
    TensorFlow on a 2-core machine. bplab's trainer never uses Keras. While
    `sys.modules["keras.src.optimizers"]` is None that import fails at once with ImportError,
    which TensorFlow catches; the entry is removed afterwards, so `tf.keras` still loads
    lazily on first use. Nothing changes when Keras is already imported."""
    import sys

    skip = "keras.src.optimizers"
    blocked = skip not in sys.modules
    if blocked:
        sys.modules[skip] = None
    try:
        import tensorflow as tf
    finally:
        if blocked and sys.modules.get(skip, 0) is None:
            del sys.modules[skip]
    return tf


def classify_exception(error: BaseException) -> str:
    """Failure class of an exception raised while training (see analysis.rundir.FAILURE_CLASSES)."""
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


def resident_mb() -> float:
    """This process's resident memory in MiB (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except Exception:
            return 0.0
