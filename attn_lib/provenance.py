"""Where a number came from: commit, versions, device. Every results file carries this."""
from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch

from . import __version__


def git_commit() -> str | None:
    """``HEAD`` of the checkout the package runs from (``-dirty`` if tracked files changed), or None."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device, seed: int | None = None, command: str | None = None) -> dict:
    """The facts a results file records about the run that produced it."""
    return {"command": command, "git_commit": git_commit(), "attn_lib": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "device_name": device_name(device),
            "seed": seed, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
