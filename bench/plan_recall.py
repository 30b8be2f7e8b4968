"""Benchmark (not a test): recall@10 of `auto`'s one-node pick against its multi-node plan on bench/scale.py's data.

    python bench/plan_recall.py                      # 200k vectors, ~1 min on one core
    python bench/plan_recall.py --nb 1000000         # closer to the 10M case, several minutes

For 10M x 384 under 4 GiB, ``auto`` picks ``IVF8192,PQ96np`` on one node and ``IVF8192,PQ48np,Refine(SQ8)`` over
two (docs/index.md "The automatic choice"). This builds the same three code kinds (PQ96, PQ48 + SQ8 refinement
re-ranking k x 16 as the index job does, IVF-Flat) with the IVF lists ``nlist_for`` gives at ``--nb`` on
``bench.scale.Mixture`` vectors (the clustered synthetic data of the 10M run), and prints recall@10 against exact
search for held-out queries from the same mixture at several nprobe. One thread, one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scale import D, Mixture  # noqa: E402
from sharding.choice import nlist_for  # noqa: E402
from sharding.tuning import REFINE_K_FACTOR  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nb", type=int, default=200_000, help="database vectors")
    ap.add_argument("--nq", type=int, default=1000, help="held-out queries")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    k, mix, nlist = 10, Mixture(), nlist_for(args.nb)
    xb, _ = mix.vectors(np.random.default_rng(1), args.nb)
    xq, _ = mix.vectors(np.random.default_rng(2), args.nq)
    exact = faiss.IndexFlatIP(D)
    exact.add(xb)
    _, gt = exact.search(xq, k)
    xt = xb[: 50 * nlist]  # 50 training vectors per list, as auto sizes the sample
    print(f"{args.nb:,} x {D} vectors, {args.nq} queries, IVF{nlist}, {len(xt):,} training vectors")
    for factory in (f"IVF{nlist},PQ96np", f"IVF{nlist},PQ48np,Refine(SQ8)", f"IVF{nlist},Flat"):
        t = time.perf_counter()
        index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(xt)
        index.add(xb)
        if "Refine" in factory:
            index.k_factor = REFINE_K_FACTOR
        row = []
        for nprobe in (16, 64, 256):
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            _, I = index.search(xq, k)
            recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(I.tolist(), gt.tolist(), strict=True)])
            row.append(f"nprobe={nprobe}: {recall:.3f}")
        print(f"{factory:32s} {', '.join(row)} ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
