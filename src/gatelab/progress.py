"""Progress display: tqdm bars that redraw in place on a terminal, and plain lines in logs (CI, files).

When stderr is not a terminal, a bar writes one line when it starts, then at most one line every
LOG_INTERVAL seconds (GATELAB_PROGRESS_SECONDS overrides it, e.g. 1), and a last line when it ends, so a
log shows work advancing instead of one carriage-return-joined line that is rewritten every 30 s.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import time

LOG_INTERVAL = 10.0  # seconds between progress lines in a log


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("GATELAB_PROGRESS_SECONDS", LOG_INTERVAL)))
    except ValueError:
        return LOG_INTERVAL


class LineWriter:
    """A file for tqdm that turns each redraw into a plain line, at most one per `interval` seconds (unless
    `force` is set: a bar's last line is always written)."""

    def __init__(self, stream, interval: float):
        self.stream, self.interval = stream, interval
        self.last: float | None = None
        self.force = False
        self.bar = None  # the bar writing here: its count at the last line written is kept in written_n
        self.written_n = None

    def write(self, s: str) -> None:
        text = _ANSI.sub("", s).replace("\r", "").strip()
        if not text:
            return
        now = time.monotonic()
        if self.force or self.last is None or now - self.last >= self.interval:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.last = now
            self.written_n = getattr(self.bar, "n", None)

    def flush(self) -> None:
        self.stream.flush()


def _log_bar_class():
    from tqdm.std import tqdm

    class LogBar(tqdm):
        """tqdm writing plain lines (see LineWriter); always leaves its final state as a last line."""

        line_writer: LineWriter | None = None

        def close(self):
            writer = self.line_writer
            if writer is not None:  # the final state, unless the last line written shows it already
                writer.force = writer.written_n != getattr(self, "n", None)
                if not writer.force:
                    self.leave = False  # nothing more to write (and nothing to clear in a log)
            super().close()

    return LogBar


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """A tqdm bar on stderr (or kwargs["file"]): in place on a terminal, plain lines otherwise."""
    stream = kwargs.pop("file", None) or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if interactive:
        from tqdm.auto import tqdm
        kwargs.setdefault("mininterval", 0.5)
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, disable=disable, file=stream, **kwargs)
    interval = kwargs.pop("mininterval", None)
    interval = log_interval() if interval is None else interval
    kwargs.update(leave=True, dynamic_ncols=False)
    kwargs.setdefault("miniters", 1)
    writer = LineWriter(stream, interval)
    bar = _log_bar_class()(iterable, disable=disable, file=writer, mininterval=interval, **kwargs)
    bar.line_writer, writer.bar = writer, bar
    return bar


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
