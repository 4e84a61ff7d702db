"""Test set-up: 8 simulated CPU devices (must be set before jax is imported), shared tiny configs."""

import os
import tempfile

# Tiny test models spend far more time compiling than running: XLA:CPU's backend optimisation level 0
# cuts compile time about 2-3x (numerics stay IEEE; only fusion and codegen choices change).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "MINIMIND_JAX_CACHE_DIR" not in os.environ:  # jsonl line indexes of big test files stay out of ~/.cache
    os.environ["MINIMIND_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="minimind-jax-cache-")

import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"

TINY_PRESETS = ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"]


@pytest.fixture(params=TINY_PRESETS)
def tiny_preset(request):
    return request.param


def pytest_configure(config):
    """Under ``pytest -n N`` send tests marked ``xdist_group`` to one worker (xdist's ``loadgroup``; the others are
    spread as with ``load``): tests/test_pipeline.py's module fixture trains the whole pipeline once, and it
    would run again on every worker that receives one of its tests. The controller switches the scheduler; the
    workers (which re-parse the command line, so see no ``--dist loadgroup``) learn it from the environment
    they inherit and tag their test ids with the group, as ``--dist loadgroup`` would."""
    if hasattr(config, "workerinput"):
        if os.environ.get("MINIMIND_TESTS_LOADGROUP") == "1":
            config.option.loadgroup = True
    elif getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
        os.environ["MINIMIND_TESTS_LOADGROUP"] = "1"
