"""Worker processes for units run side by side: one per GPU (times jobs per GPU), or one on the CPU."""
from __future__ import annotations

import torch

from gatelab.config import GatelabError


def _worker_label(worker: str) -> str:
    return "cpu" if worker == "cpu" else f"GPU {worker}"


def _die_with_parent() -> None:
    """Children end when the sweep's process dies, even by SIGKILL (Linux), so a restarted sweep never races an
    orphan over the same unit."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def workers_for(gpus: str | int | None, device: str, per_gpu: int = 1) -> list[str] | None:
    """The worker list of `--gpus N|all` with `--jobs-per-gpu M`: M workers per GPU (M units share each GPU: a unit
    of the 31M model leaves most of an H100 idle), ordered GPU 0, 1, ..., 0, 1, ... so that units spread over the
    GPUs first; None for the plain in-process run. With device=cpu, N x M CPU processes."""
    if per_gpu < 1:
        raise GatelabError(f"--jobs-per-gpu must be >= 1, got {per_gpu}")
    if device == "cpu":
        if gpus == "all":
            raise GatelabError("--gpus all needs GPUs; with --device cpu give a number of processes")
        n = int(gpus or 1) * per_gpu
        return ["cpu"] * n if n > 1 else None
    if gpus in (None, 1, "1") and per_gpu == 1:
        return None
    visible = torch.cuda.device_count()
    if gpus in (None, 1, "1") and not visible:
        raise GatelabError("--jobs-per-gpu needs a GPU (with --device cpu, use --gpus N for N processes)")
    n = visible if gpus == "all" else int(gpus or 1)
    if n < 1:
        raise GatelabError(f"--gpus must be >= 1 or all, got {gpus}")
    if n > visible:
        raise GatelabError(f"--gpus {gpus}: only {visible} GPU(s) are visible (with --device cpu, --gpus N runs "
                           f"N CPU processes)")
    return [str(i) for i in range(n)] * per_gpu if n * per_gpu > 1 else None
