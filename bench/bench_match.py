"""Benchmark of the matchers: column-removal reference zipit vs the fast zipit, and permute.

Usage: python bench/bench_match.py [--ref-max F] [--sizes 64,128,...] [--seed S]

Correlations come from random features with structure: model B's features are a noisy,
rescaled permutation of model A's (plus a few dead channels), 4F samples. The reference is the
plain loop from tests/test_match.py (flat argmax, remove a row and column per merge); every
size where both run is also checked for an identical result.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from onnxzip.matchers import correlation_from_covariance, match  # noqa: E402
from test_match import reference_zipit  # noqa: E402


def make_corr(F: int, rng: np.random.Generator) -> np.ndarray:
    samples = 4 * F
    a = rng.standard_normal((F, samples))
    perm = rng.permutation(F)
    b = a[perm] * rng.uniform(0.2, 1.0, (F, 1)) + rng.standard_normal((F, samples))
    feats = np.vstack([a, b])
    feats[rng.choice(2 * F, size=max(1, F // 64), replace=False)] = 0.0  # dead channels
    return correlation_from_covariance(np.cov(feats))


def timed(fn, repeat=1):
    """Best of ``repeat`` runs, in CPU seconds of this process (robust on a shared machine;
    all timed code is single-threaded)."""
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t)
    return best, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128,256,512,1024,2048")
    ap.add_argument("--ref-max", type=int, default=512, help="largest F to run the reference on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--beta", type=float, default=0.125)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"numpy {np.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} cpus; alpha={args.alpha} beta={args.beta}; "
          "times: best-of-N CPU seconds")
    print(f"{'F/model':>8} {'ref zipit s':>12} {'fast zipit s':>13} {'speed-up':>9} "
          f"{'same':>5} {'permute s':>10}")
    rng = np.random.default_rng(args.seed)
    for F in sizes:
        corr = make_corr(F, rng)
        rep = 3 if F <= 256 else 2
        t_fast, (m, u) = timed(lambda: match(corr, "zipit", alpha=args.alpha, beta=args.beta), rep)
        t_perm, _ = timed(lambda: match(corr, "permute"), rep)
        if F <= args.ref_max:
            t_ref, (mr, ur) = timed(lambda: reference_zipit(corr, args.alpha, args.beta), rep)
            same = "yes" if np.array_equal(u, ur) and np.array_equal(m, mr) else "NO"
            print(f"{F:>8} {t_ref:>12.3f} {t_fast:>13.3f} {t_ref / t_fast:>8.1f}x {same:>5} "
                  f"{t_perm:>10.3f}")
        else:
            print(f"{F:>8} {'-':>12} {t_fast:>13.3f} {'-':>9} {'-':>5} {t_perm:>10.3f}")


if __name__ == "__main__":
    main()
