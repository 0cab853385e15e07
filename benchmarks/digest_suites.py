"""Digest every embedded suite's distinct cases (as tests/test_suites_run picks them), 3 steps each, in one process.

    python benchmarks/digest_suites.py TREE [SUITE ...] [KEY=VALUE ...]

KEY=VALUE changes a setting of every case, as `bplab run --set` does (graph_optimizer=true: the
numbers of a tree from before that setting)."""
import sys, time, os, hashlib, json
tree = sys.argv[1]
sys.path.insert(0, tree)
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from workers.actor import import_tensorflow
tf = import_tensorflow()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import workers.trainer as T
from jobs import suites, plan
from workers.data import load_dataset
EMBEDDED = ("quick", "moons", "moons-quick", "dni-quick", "dcn-quick", "adversarial-quick", "adversarial-source-quick",
            "unfair-source-quick", "feedback-quick")
changes = [a for a in sys.argv[2:] if "=" in a]
only = [a for a in sys.argv[2:] if "=" not in a] or EMBEDDED
def digest(reps):
    h = hashlib.sha256()
    joined = {}
    for r in reps:
        if r.rows:
            for k, v in r.rows.columns.items():
                joined.setdefault(k, []).extend(v.tolist())
    for k in sorted(joined):
        if k in ("wall_time", "examples_per_sec"): continue
        h.update(k.encode()); h.update(repr(joined[k]).encode())
    h.update(repr([x for r in reps for x in r.alignment]).encode()); h.update(repr([x for r in reps for x in r.layer_stats]).encode())
    ck = [r.checkpoint for r in reps if r.checkpoint is not None][-1]
    for u in T.unpack_checkpoint(ck)[0]:
        for k in sorted(u): h.update(u[k].tobytes())
    return h.hexdigest()[:12]
seen = set()
for name in only:
    suite = suites.load_suite(name, ["epochs=1", "steps_per_epoch=3", *changes])
    for case in suite.cases:
        s = case.settings
        key = json.dumps({k: v for k, v in s.to_dict().items() if k not in ("seed",)}, sort_keys=True, default=str)
        if key in seen: continue
        seen.add(key)
        data = load_dataset(s.data)
        reps = []
        t = time.perf_counter()
        T.train(s, data, reps.append)
        print(f"{name}/{case.name} {time.perf_counter() - t:.2f}s {digest(reps)}", flush=True)
