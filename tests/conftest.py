"""Fixtures of the test suite (its helper functions are in helpers.py)."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from helpers import SMALL_SPEC

# Category-metadata caches of the tests' datasets go to a folder of this run (inherited by
# the train_net.py subprocesses), not to the user's ~/.cache/eql_d2.
if "EQL_D2_CACHE_DIR" not in os.environ:
    os.environ["EQL_D2_CACHE_DIR"] = tempfile.mkdtemp(prefix="eql_d2_test_cache_")
    atexit.register(shutil.rmtree, os.environ["EQL_D2_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def small_synthetic(tmp_path_factory):
    from eql_d2.data import synthetic

    out = tmp_path_factory.mktemp("synthetic") / "slt"
    synthetic.generate(str(out), synthetic.SyntheticLTSpec(**SMALL_SPEC))
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (restored after): small tensors and tiny
    models run fastest that way, and OpenMP synchronisation dominates on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
