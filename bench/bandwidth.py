"""The read-bandwidth probe every benchmark compares itself with, measured in the same
run and with the same thread count as the kernel it accompanies."""

from __future__ import annotations

import threading
import time

import numpy as np

import moequant


def read_bandwidth(gib: float = 1.0, threads: int = 0, reps: int = 5, huge_pages: bool = True) -> float:
    """Best-of-`reps` GB/s of summing a `gib` GiB int64 array split over threads.

    numpy asks Linux for transparent huge pages for large arrays (its default), so the
    probe reads from huge pages; with ``huge_pages=False`` it reads from 4 KiB pages
    (NaN where numpy offers no switch), which is slower on some machines: kernels are
    compared with the huge-page figure, the stronger one.
    """
    threads = threads or moequant.get_num_threads()
    core = getattr(np, "_core", None) or np.core
    switch = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if switch is None and not huge_pages:
        return float("nan")
    before = switch(huge_pages) if switch else None
    try:
        a = np.ones(int(gib * 2**30) // 8, dtype=np.int64)
    finally:
        if switch:
            switch(before)
    parts = np.array_split(a, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=p.sum) for p in parts]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best
