"""Each case of the moons suite (or --suite NAME) in one process: trained as a new structure, then
again with its executables kept (StepCache); seconds of each and a digest of what it trained
(every metrics row but wall_time and examples_per_sec, the alignment and layer-statistics rows,
the last weights).

    python benchmarks/bench_moons_cases.py TREE [CASE_INDEX ...] [KEY=VALUE ...] [--suite NAME]

TREE is the checkout to import. Two trees with the same digests trained the same numbers.
KEY=VALUE changes a setting of every case, as `bplab run --set` does (e.g. alignment_every=0:
what measuring alignment costs; graph_optimizer=true: what Grappler costs a traced
structure)."""
import sys, time, os, hashlib, pickle
argv = list(sys.argv)
suite_name = "moons"
if "--suite" in argv:
    suite_name = argv.pop(argv.index("--suite") + 1)
    argv.remove("--suite")
sys.path.insert(0, argv[1])
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from workers.actor import import_tensorflow
tf = import_tensorflow()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
import workers.trainer as T
from jobs.suites import load_suite
from workers.data import load_dataset
changes = [a for a in argv[2:] if "=" in a]
cases = load_suite(suite_name, changes).cases
cache = T.StepCache()
idx = [int(a) for a in argv[2:] if "=" not in a] or [2, 14]
res = []
def digest(reps):
    h = hashlib.sha256()
    rows = [{k: v for k, v in row.items() if k not in ("wall_time", "examples_per_sec")} for r in reps for row in r.rows]
    h.update(repr(rows).encode())
    h.update(repr([x for r in reps for x in r.alignment]).encode())
    h.update(repr([x for r in reps for x in r.layer_stats]).encode())
    ck = [r.checkpoint for r in reps if r.checkpoint is not None][-1]
    for u in T.unpack_checkpoint(ck)[0]:
        for k in sorted(u): h.update(u[k].tobytes())
    return h.hexdigest()[:12]
for i in idx:
    s = cases[i].settings
    data = load_dataset(s.data)
    for label in ("new", "kept"):
        reps = []
        t = time.perf_counter()
        T.train(s, data, reps.append, cache=cache)
        el = time.perf_counter() - t
        res.append(f"{cases[i].name}:{label}={el:.2f}s/{digest(reps)}")
print(os.path.basename(argv[1].rstrip('/')), os.getloadavg()[0], " ".join(res), flush=True)
