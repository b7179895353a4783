import hashlib
import os
from pathlib import Path

import pytest
import torch


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
