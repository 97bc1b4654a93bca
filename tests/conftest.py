"""Shared fixtures. Everything runs on the CPU, offline; real CIFAR-10 is used only when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: the lossless CIFAR-10 sprites that sit beside the checkout on the course's machines (optional)
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_cifar() -> Path:
    if not (SHARED_CIFAR / "cifar10_batch_50.png").is_file():
        pytest.skip("the lossless CIFAR-10 sprites are not beside this checkout")
    return SHARED_CIFAR


def pytest_configure(config):
    """Give the chapters (run by nbval in kernels that inherit this environment) the real CIFAR-10
    when the lossless copy sits beside the checkout and ``data/`` has none: arrays are made once per
    session in a temporary folder, never in the repository."""
    import subprocess
    import sys
    import tempfile

    if os.environ.get("ATTN_LIB_DATA_DIR") or (REPO / "data" / "cifar10_train.npz").is_file():
        return
    maker = SHARED_CIFAR / "make_npz.py"
    if not maker.is_file():
        return
    out = Path(tempfile.mkdtemp(prefix="attn-lib-cifar-"))
    done = subprocess.run([sys.executable, str(maker), str(out), "--sprites", str(SHARED_CIFAR)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        os.environ["ATTN_LIB_DATA_DIR"] = str(out)
