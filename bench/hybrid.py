"""Hybrid retrieval on a BEIR corpus (SQuAD v1.1 paragraphs): dense, lexical (BM25), hybrid (weighted, RRF).

    python bench/hybrid.py -i runs/beir/index --data ../shared/data/squad/retrieval-v1.1

Needs an index built by `ragtune index` (with its lexical part). Prints, per mode: nDCG@10, recall@10/100,
MRR@10 on every question, and the search cost per query batch (median of 3, queries already embedded), as a
ratio to dense. Then the fusion settings on a seeded split of the questions: 2,000 "dev" questions, the rest
"test", so a setting chosen on dev can be read on questions it was not chosen on. Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.search import evaluate_index  # noqa: E402
from models.embedders import QueryEncoder  # noqa: E402
from sharding.metrics import read_qrels, read_queries  # noqa: E402
from sharding.search import Fusion, ShardedIndex, search  # noqa: E402

NAMES = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--index", required=True)
    ap.add_argument("--data", required=True, help="BEIR folder: queries.jsonl, qrels/test.tsv")
    ap.add_argument("--dev", type=int, default=2000, help="questions in the dev split of the fusion sweep")
    args = ap.parse_args()

    index = ShardedIndex.open(args.index)
    queries = read_queries(Path(args.data) / "queries.jsonl")
    qrels = read_qrels(Path(args.data) / "qrels" / "test.tsv")
    qids = [q for q in queries if q in qrels]
    texts = [queries[q] for q in qids]
    xq = QueryEncoder(index.manifest).encode(texts)

    modes = {"dense": ("dense", None), "lexical (BM25)": ("lexical", None),
             "hybrid, weighted 0.5 (default)": ("hybrid", Fusion()),
             "hybrid, RRF k=60": ("hybrid", Fusion(method="rrf"))}
    print(f"{len(qids):,} questions, {index.ntotal:,} chunks in {len(index.shards)} shard(s)\n")
    print("| mode | nDCG@10 | recall@10 | recall@100 | MRR@10 | search ms / 1,000 queries (k=10) | vs dense |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for label, (mode, fusion) in modes.items():
        m = evaluate_index(index, xq, qids, qrels, mode=mode, texts=texts, fusion=fusion)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            search(index, xq[:1000], texts[:1000], 10, mode, fusion)
            times.append(time.perf_counter() - t0)
        ms = 1000 * float(np.median(times))
        base = base or ms
        print(f"| {label} | " + " | ".join(f"{m[n]:.4f}" for n in NAMES) + f" | {ms:,.0f} | {ms / base:.1f}x |")

    rng = np.random.default_rng(0)
    dev = np.zeros(len(qids), bool)
    dev[rng.choice(len(qids), min(args.dev, len(qids)), replace=False)] = True
    split = {"dev": [i for i in range(len(qids)) if dev[i]], "test": [i for i in range(len(qids)) if not dev[i]]}
    print(f"\nfusion settings, nDCG@10 on {dev.sum():,} dev / {(~dev).sum():,} test questions (seeded split):\n")
    print("| fusion | dev | test |\n|---|---|---|")
    settings = [("dense", "dense", None), ("lexical", "lexical", None)]
    settings += [(f"weighted, dense weight {w}", "hybrid", Fusion(weight=w)) for w in (0.3, 0.4, 0.5, 0.6)]
    settings += [(f"RRF k={c}", "hybrid", Fusion(method="rrf", rrf_k=c)) for c in (1, 10, 60)]
    for label, mode, fusion in settings:
        row = []
        for part in ("dev", "test"):
            ix = split[part]
            m = evaluate_index(index, xq[ix], [qids[i] for i in ix], qrels, mode=mode, texts=[texts[i] for i in ix],
                               fusion=fusion)
            row.append(f"{m['ndcg@10']:.4f}")
        print(f"| {label} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
