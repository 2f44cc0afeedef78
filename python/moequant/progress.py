"""The one progress bar (convert, eval): a line on stderr, redrawn in place on a
terminal (at most every 0.2 s); without one, a line per ``update(..., force=True)``, at
the end, and at most one every 10 s in between (``every`` overrides both intervals).

The ETA adds up each kind of work left at its own measured rate: convert's bytes
re-quantized with the mse fit take several times longer than min-max ones (which go at
about disk speed), so one overall rate would promise too early an end. A kind not
measured yet is estimated from a measured one scaled by the ratio of their ``costs``.
``update`` may be called from several threads."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Dict, Optional, Union


def fmt_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(
        self,
        total: Union[int, Dict[str, int]],
        label: str = "",
        enabled: bool = True,
        *,
        stream=None,
        fmt: Callable[[float], str] = str,
        costs: Optional[Dict[str, float]] = None,
        rate: Optional[Callable] = None,
        every: Optional[float] = None,
    ):
        """``total``: the amount of work, or amount per kind; ``fmt`` formats amounts;
        ``rate(done, seconds)`` an optional throughput field (e.g. GB/s)."""
        totals = total if isinstance(total, dict) else {"": total}
        self.totals = {k: v for k, v in totals.items() if v}
        self.total = sum(self.totals.values())
        self.label, self.enabled, self.fmt, self.rate = label, enabled, fmt, rate
        self.costs = costs or {}
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.every = every if every is not None else (0.2 if self.tty else 10.0)
        self.done = {k: 0 for k in self.totals}
        self.spent = {k: 0.0 for k in self.totals}
        self.t0 = self.last = self.mark = time.perf_counter()
        self._lock = threading.Lock()
        self._draw(self.t0, "")

    @property
    def done_total(self) -> int:
        return sum(self.done.values())

    def eta(self) -> float:
        rate = {k: self.done[k] / self.spent[k] for k in self.totals if self.done[k] and self.spent[k] > 0}
        if not rate:
            return 0.0
        ref_kind, ref = next(iter(rate.items()))
        cost = lambda k: self.costs.get(k, 1.0)  # noqa: E731
        return sum(
            (total - self.done[k]) / rate.get(k, ref * cost(ref_kind) / cost(k))
            for k, total in self.totals.items()
        )

    def update(self, n: int = 1, kind: str = "", status: str = "", force: bool = False) -> None:
        """``n`` more of ``kind`` done since the last update (the time since then is
        charged to it); ``status`` is shown after the count; ``force`` draws now (and, on a
        file, prints a line)."""
        with self._lock:
            now = time.perf_counter()
            if kind in self.done:
                self.done[kind] += n
                self.spent[kind] += now - self.mark
            self.mark = now
            if force or now - self.last >= self.every or self.done_total >= self.total:
                self._draw(now, status)

    def _draw(self, now: float, status: str) -> None:
        if not self.enabled or (not self.tty and now == self.t0):
            return
        self.last = now
        done, el = self.done_total, now - self.t0
        frac = min(done / self.total, 1.0) if self.total else 1.0
        width = 24
        line = (
            f"{self.label + ' ' if self.label else ''}[{'#' * int(frac * width):<{width}}] "
            f"{self.fmt(done)}/{self.fmt(self.total)}{'  ' + status if status else ''}"
            f"{'  ' + self.rate(done, el) if self.rate else ''}  "
            f"{fmt_eta(el)} elapsed, ETA {fmt_eta(self.eta())}"
        )
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
