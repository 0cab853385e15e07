"""The start of a child script that measures one tree (a checkout) in a fresh interpreter:
the tree (sys.argv[1]) first on sys.path, TensorFlow imported and set up as a worker with one
CPU sets it up (one intra-op and one inter-op thread). Shared by the bench_* scripts that
compare trees."""

TREE_CHILD_PREAMBLE = r"""
import gc, json, os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
from workers.actor import import_tensorflow
tf = import_tensorflow()
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
"""
