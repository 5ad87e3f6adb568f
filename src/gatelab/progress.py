"""Progress display: tqdm bars that redraw often on a terminal and rarely in logs (CI, files)."""
from __future__ import annotations

import ctypes
import sys


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    from tqdm.auto import tqdm
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    return tqdm(iterable, disable=disable, **kwargs)


def keep_freed_memory() -> None:
    """Ask glibc to keep large freed blocks instead of unmapping them: on CPU, training allocates and frees
    ~0.4 GB of logits every step, and re-faulting those pages doubled the step time (measured: 1.3 s -> 0.65 s
    for the demo model on 2 cores). No-op outside glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError):
        pass
