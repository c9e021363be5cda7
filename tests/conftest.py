"""Test-session setup that must happen before JAX initialises its backend."""

import os

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the whole test session: many tests compile the same
# tiny programs (a trainer per test), and the cache turns each repeat into a file read. Made by
# the first process (the xdist controller, or plain pytest) and inherited through the
# environment by the workers and every subprocess (multi-process runs, the benchmark, notebook
# kernels); removed at exit, so a run never reads another run's entries. A user's own
# JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="switchmoe-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite compiles hundreds of small programs, and LLVM's optimisation is most of each
# XLA:CPU compile while buying nothing at these sizes: at level 0 the expert-parallel layer
# tests ran in 29.5 s instead of 43.7 s (one run, quiet machine). Only code generation changes
# (the HLO passes, hence fusion and FLOP counts, are the same); benchmarks and runs outside the
# tests keep XLA's default. Inherited by the workers and every subprocess.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# Expert-parallel tests run on 8 fake CPU devices. This must be set before the first JAX
# computation; setting it later silently does nothing.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Libraries that read absl flags at import time break under pytest unless flags count as parsed.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Files with the most work, first. `make test` runs two xdist workers that each take whole files
# in collection order (--dist loadfile); starting with the longest files keeps one worker from
# finishing a long file alone at the end (longest-first scheduling). Rough order from
# `--durations` on this machine; files not named follow alphabetically.
LONGEST_FIRST = (
    "test_notebooks.py",
    "test_sweep.py",
    "test_multiprocess.py",
    "test_expert_parallel.py",
    "test_train.py",
    "test_preemption.py",
    "test_streaming.py",
    "test_encoder_decoder.py",
    "test_init_from.py",
    "test_generation.py",
    "test_benchmark.py",
    "test_hf_switch.py",
    "test_hf_tokenizer.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An empty TFDS directory per test file: the first run in it builds the corpus there
    (test files that need a particular corpus override this fixture)."""
    return str(tmp_path_factory.mktemp("tfds"))
