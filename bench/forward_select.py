"""Time nestune.forward_select on a NES-sized pool, and against a naive ForwardSelect.

    python bench/forward_select.py [--k 400] [--n 10000] [--c 100] [--m 10] [--naive-k 40]

The pool is K members' validation probabilities, stored as float16 (as members are stored),
drawn as softmaxes of Gaussian logits (logistic-normal, Dirichlet-like) with a member-specific
boost of the true class so that members differ in skill. forward_select is timed on the full
pool, best of 3. The naive reference (for each step, for each candidate, average the full (N, C)
probabilities and take the NLL) would take minutes on the full pool, so the ratio is measured on
the first --naive-k members (same N, C, M), both implementations timed there, best of 3, and
their selections checked equal.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from nestune import forward_select
from nestune.platform.metrics import EPS


def make_pool(k: int, n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    pool = np.empty((k, n, c), dtype=np.float16)
    rows = np.arange(n)
    for i in range(k):
        # logistic-normal (the softmax of Gaussian logits), a cheap stand-in for a Dirichlet:
        # a member-specific boost of the true class (skill) and scale (sharpness)
        logits = rng.standard_normal((n, c), dtype=np.float32)
        logits *= rng.uniform(1.0, 3.0)
        logits[rows, labels] += rng.uniform(1.0, 6.0)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        pool[i] = logits
    return pool, labels


def naive_forward_select(pool: np.ndarray, labels: np.ndarray, size: int) -> list[int]:
    """Textbook greedy without replacement: full (N, C) average for every candidate."""
    n = pool.shape[1]
    rows = np.arange(n)
    running = np.zeros(pool.shape[1:], dtype=np.float64)
    chosen: list[int] = []
    for step in range(size):
        best, best_nll = -1, np.inf
        for k in range(pool.shape[0]):
            if k in chosen:
                continue
            avg = (running + pool[k].astype(np.float64)) / (step + 1)
            value = -np.mean(np.log(np.maximum(avg[rows, labels], EPS)))
            if value < best_nll:
                best, best_nll = k, value
        chosen.append(best)
        running += pool[best]
    return chosen


def best_of(fn, repeats: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", type=int, default=400, help="pool size K")
    ap.add_argument("--n", type=int, default=10_000, help="validation samples N")
    ap.add_argument("--c", type=int, default=100, help="classes C")
    ap.add_argument("--m", type=int, default=10, help="ensemble size M")
    ap.add_argument("--naive-k", type=int, default=40, help="pool size for the naive comparison")
    args = ap.parse_args()

    t0 = time.perf_counter()
    pool, labels = make_pool(args.k, args.n, args.c)
    print(
        f"pool: K={args.k} N={args.n} C={args.c} float16 ({pool.nbytes / 2**20:.0f} MiB), "
        f"made in {time.perf_counter() - t0:.1f} s; ensemble size M={args.m}"
    )

    fast_full, sel = best_of(lambda: forward_select(pool, labels, args.m))
    print(f"forward_select   K={args.k}: {fast_full * 1e3:8.1f} ms (best of 3)  -> {sel}")

    small = pool[: args.naive_k]
    fast_small, sel_fast = best_of(lambda: forward_select(small, labels, args.m))
    naive_small, sel_naive = best_of(lambda: naive_forward_select(small, labels, args.m))
    same = "same selection" if sel_fast == sel_naive else f"DIFFERENT: {sel_fast} vs {sel_naive}"
    print(
        f"on the first K={args.naive_k} members (naive is too slow on the full pool): "
        f"forward_select {fast_small * 1e3:.1f} ms, naive {naive_small * 1e3:.1f} ms "
        f"(best of 3 each) -> naive / forward_select = {naive_small / fast_small:.0f}x; {same}"
    )


if __name__ == "__main__":
    main()
