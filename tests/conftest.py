import hashlib
import os
from pathlib import Path

import pytest
import torch
import atexit
import shutil
import tempfile

from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests in parallel processes (pytest-xdist): the cores shared out, not oversubscribed
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # and the commands that tests start in subprocesses
    torch.set_num_threads(_THREADS)
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import InMemoryExampleDatabase

# tests write nothing into the repository: hypothesis keeps its examples in memory and its other
# files in a temporary folder (pytest's own cache is off in pyproject.toml)
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="mpocompress-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("mpocompress", database=InMemoryExampleDatabase())
settings.load_profile("mpocompress")


@pytest.fixture(autouse=True)
def _no_plain_progress(monkeypatch):
    """In-process commands see stderr as a log; their plain progress lines (printed for steps slower than
    a couple of seconds, as a loaded machine makes any step) are off, so that an error is the one line
    the contract promises. tests/test_first_hour.py turns them on to test them."""
    import mpocompress.cli.render as rendering

    monkeypatch.setattr(rendering, "PLAIN_AFTER_S", float("inf"))
    monkeypatch.setattr(rendering, "PLAIN_EVERY_S", float("inf"))
    yield


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    yield


SHARED_DATA = Path(os.environ.get("MPOCOMPRESS_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real MNIST / Fashion-MNIST files in ../shared/data, verified against its SHA256SUMS.
    Missing files fail the tests (they are part of the CI setup), they never skip them."""
    sums = SHARED_DATA / "SHA256SUMS"
    assert sums.is_file(), f"{sums} not found: the tests need ../shared/data beside the repository (or MPOCOMPRESS_TEST_DATA)"
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = SHARED_DATA / name.lstrip("*")
        assert path.is_file(), f"{path} listed in SHA256SUMS is missing"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} does not match SHA256SUMS"
    return SHARED_DATA


@pytest.fixture
def graph_of():
    """build(module, x, how): the module captured as a graph by `how` ("trace", "export" or
    "compile", fullgraph) in the caller's grad mode, returned as a function that runs it; the
    tracer's and compiler's notes are silenced while capturing and running."""
    import warnings

    def quiet(fn, *args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python values, deprecation notes
            return fn(*args)

    def capture(module, x, how):
        if how == "trace":
            return torch.jit.trace(module, x)
        if how == "export":
            return torch.export.export(module, (x,)).module()
        torch._dynamo.reset()
        return torch.compile(module, fullgraph=True)

    def build(module, x, how):
        graph = quiet(capture, module, x, how)
        return lambda inp: quiet(graph, inp)

    return build
