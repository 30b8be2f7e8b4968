"""Benchmark: IVF shards of one trained index, each searched alone vs one coarse quantization for all of them.

    python bench/ivf_shards.py                                   # 8 shards x 50k x 384, IVF1024, nprobe 16
    python bench/ivf_shards.py --shards 4 --per-shard 20000 --kinds IVF1024,Flat

Builds the shards as the index job does (train once on a sample, add each shard's vectors to a copy of the trained
empty index), writes them as a version and opens it with ``ShardedIndex``. For each kind and query batch size it
times ``ShardedIndex.search_each`` (every shard quantizes each query again: the search before quantize-once) and
``ShardedIndex.search`` (one quantization per query, ``search_preassigned`` per shard), both followed by the same
exact merge, on the same opened shards; checks the results are identical; prints queries/s, medians of ``--runs``.
Structured synthetic vectors (faiss ``SyntheticDataset``), L2-normalised, inner product.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--kinds", default="IVF1024,Flat;IVF1024,PQ48np", help="factory strings, ';'-separated")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--batches", default="1,16,1000", help="queries per call")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import faiss
    import pyarrow as pa
    from faiss.contrib.datasets import SyntheticDataset

    from sharding.docstore import write_docstore
    from sharding.faiss_index import (
        ShardBuilder,
        effective_factory,
        new_index,
        serialize,
        train_index,
        write_index_file,
    )
    from sharding.layout import Piece, docstore_name, shard_name, version_name
    from sharding.manifest import IndexManifest, ShardRecord, switch_latest, write_index_manifest
    from sharding.search import ShardedIndex
    from sharding.storage import makedirs, resolve, sha256_hex

    nb = args.shards * args.per_shard
    ds = SyntheticDataset(args.d, 50_000, nb, 1000, metric="IP")
    xb, xq, xt = ds.get_database(), ds.get_queries(), ds.get_train()
    for x in (xb, xq, xt):
        faiss.normalize_L2(x)
    ids = np.arange(nb, dtype=np.int64) * 7919 + 13
    print(f"{args.shards} shards x {args.per_shard:,} vectors, d={args.d}, nprobe={args.nprobe}, "
          f"{faiss.omp_get_max_threads()} OpenMP threads, faiss {faiss.__version__}; queries/s, median of {args.runs}")
    for kind in args.kinds.split(";"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            factory = effective_factory(kind, args.d, "inner_product")
            blob = serialize(train_index(new_index(factory, args.d, "inner_product"), xt))
            vdir = resolve(tmp).join(version_name(1))
            makedirs(vdir.join("docstore"))
            records = []
            for s in range(args.shards):
                lo, hi = s * args.per_shard, (s + 1) * args.per_shard
                builder = ShardBuilder(faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))
                builder.add(ids[lo:hi], xb[lo:hi])
                sha, size = write_index_file(builder.finish(), vdir.join(shard_name(s)))
                dsha, dsize = write_docstore(pa.table({"chunk_id": ids[lo:hi], "doc_id": ["d"] * (hi - lo),
                                                       "text": [""] * (hi - lo)}), vdir.join(docstore_name(s)))
                records.append(ShardRecord(file=shard_name(s), ntotal=hi - lo, sha256=sha, bytes=size,
                                           docstore=docstore_name(s), docstore_sha256=dsha, docstore_bytes=dsize,
                                           pieces=[Piece(part="synthetic", start=lo, stop=hi)]))
            write_index_manifest(vdir, IndexManifest(
                version=version_name(1), factory=factory, kind="bench", reason="bench", metric="inner_product",
                dim=args.d, normalize=True, ntotal=nb, shards=records, model={"name": "bench", "revision": "r"},
                trained={"sha256": sha256_hex(blob)}, search_params={"nprobe": args.nprobe}))
            switch_latest(resolve(tmp), version_name(1))
            index = ShardedIndex.open(tmp, verify=False)
            print(f"{kind}: built in {time.perf_counter() - t0:.1f}s")
            for nq in (int(b) for b in args.batches.split(",")):
                qps = measure(index, xq, nq, args.runs)
                print(f"  {nq:>5} queries/call: each shard quantizes {qps['each']:>8,.0f}   quantized once "
                      f"{qps['once']:>8,.0f}   x{qps['once'] / qps['each']:.2f}   (identical results)")


def measure(index, xq: np.ndarray, nq: int, runs: int) -> dict[str, float]:
    """Queries/s of both paths on batches of ``nq`` queries (200 single queries per run), runs interleaved."""
    from sharding.search import check_queries, merge_topk

    calls = max(1, 200 // nq)
    batches = [check_queries(xq[(i * nq) % len(xq):][:nq], index.manifest) for i in range(calls)]

    def each(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Ds, Is = zip(*index.search_each(q, 10), strict=True)
        return merge_topk(Ds, Is, 10, index.manifest.metric)

    def once(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return index.search(q, 10)

    for q in batches[:3]:
        a, b = each(q), once(q)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), "results differ"
    times: dict[str, list[float]] = {"each": [], "once": []}
    for _ in range(runs):
        for name, fn in (("each", each), ("once", once)):
            t = time.perf_counter()
            for q in batches:
                fn(q)
            times[name].append(time.perf_counter() - t)
    return {name: calls * nq / statistics.median(ts) for name, ts in times.items()}

if __name__ == "__main__":
    main()
