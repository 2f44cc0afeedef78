"""The read-bandwidth probe every benchmark compares itself with, measured in the same
run and with the same thread count as the kernel it accompanies. Run alone, it prints
the figure for this machine.

    python bench/bandwidth.py [--gib 1] [--threads N] [--reps 5] [--no-huge-pages]
"""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="GiB summed per repetition (default: %(default)s)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads (default: moequant's thread count, MOEQUANT_NUM_THREADS or all cores)",
    )
    ap.add_argument(
        "--reps", type=int, default=5, help="repetitions, the best reported (default: %(default)s)"
    )
    ap.add_argument(
        "--no-huge-pages",
        dest="huge_pages",
        action="store_false",
        help="read from 4 KiB pages instead of transparent huge pages",
    )
    return ap


if __name__ == "__main__":
    a = build_parser().parse_args()
    gbs = read_bandwidth(a.gib, a.threads, a.reps, a.huge_pages)
    pages = "huge pages" if a.huge_pages else "4 KiB pages"
    print(
        f"read bandwidth: {gbs:.2f} GB/s ({a.threads or moequant.get_num_threads()} threads, "
        f"{a.gib:g} GiB, best of {a.reps}, {pages})"
    )
