"""Peak memory of one BM25 shard build: the whole shard's token lists at once (``build_shard``, what the index
job did before) against counting a batch at a time (``DocTerms``, what it does now), on real text.

    python bench/lexical_memory.py [--rows 50000,100000,200000] [--batch 8192]

Each build runs in its own process; its peak RSS (``ru_maxrss``) above the process' RSS before the build is what
is printed, per row, with the ratio of the two in the same run. The text: SQuAD v1.1 dev paragraphs (2,067, real
Wikipedia text, ../shared/data), repeated with their words shuffled to reach the row count (so the vocabulary
stays that of the paragraphs, about 20k terms: a larger vocabulary adds to both the same per term). The
statistics pass is counted in the same process first, as the job's first pass does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import statistics
import sys
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def paragraphs() -> list[str]:
    shared = os.environ.get("RAGTUNE_SHARED", os.path.join(ROOT, "..", "shared"))
    path = os.path.join(shared, "data", "squad", "retrieval-v1.1", "corpus.jsonl")
    if not os.path.exists(path):
        sys.exit(f"needs the SQuAD corpus at {path} (set RAGTUNE_SHARED to the folder holding data/)")
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def texts(rows: int, batch: int) -> Iterator[list[str]]:
    """``rows`` texts in batches: the paragraphs in order, then again with each one's words shuffled."""
    paras, rng, out = paragraphs(), random.Random(0), []
    for i in range(rows):
        p = paras[i % len(paras)]
        if i >= len(paras):
            words = p.split()
            rng.shuffle(words)
            p = " ".join(words)
        out.append(p)
        if len(out) == batch:
            yield out
            out = []
    if out:
        yield out


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def build(way: str, rows: int, batch: int, q: mp.Queue) -> None:
    import numpy as np

    from sharding.lexical import CorpusStats, DocTerms, LexicalParams, build_shard, tokenizer

    params = LexicalParams()
    tokenize = tokenizer(params)
    tokenize(["warm up the stemmer and the stopwords"])
    stats = CorpusStats.of(t for b in texts(rows, batch) for t in tokenize(b))  # the first pass, streamed
    before = rss_kib()
    if way == "at once":  # the shard's texts and token lists held together, as the job did before
        all_texts = [t for b in texts(rows, batch) for t in b]
        shard = build_shard(tokenize(all_texts), np.arange(rows), stats, params)
    else:
        terms = DocTerms()
        for b in texts(rows, batch):
            terms.add(tokenize(b))
        shard = terms.finish(np.arange(rows), stats, params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nnz = len(shard.model.scores["data"])
    q.put({"way": way, "rows": rows, "peak_above_kib": peak - before, "nnz": nnz})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="50000,100000,200000")
    ap.add_argument("--batch", type=int, default=8192)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        for way in ("at once", "batched"):
            q: mp.Queue = ctx.Queue()
            p = ctx.Process(target=build, args=(way, rows, args.batch, q))
            p.start()
            r = q.get()
            p.join()
            results.append(r)
            print(f"{rows:>9,} rows  {way:<8}  peak above start {r['peak_above_kib'] / 1024:8.1f} MiB  "
                  f"{r['peak_above_kib'] * 1024 / rows:7.0f} B/row  {r['nnz'] / rows:6.1f} (chunk, term) pairs/row",
                  flush=True)
    per = {w: [r["peak_above_kib"] * 1024 / r["rows"] for r in results if r["way"] == w]
           for w in ("at once", "batched")}
    pairs = statistics.median(r["nnz"] / r["rows"] for r in results)
    a, b = statistics.median(per["at once"]), statistics.median(per["batched"])
    print(f"median bytes/row: at once {a:,.0f}, batched {b:,.0f} (ratio batched/at once {b / a:.2f}); "
          f"{pairs:.1f} pairs/row, batched {b / pairs:.1f} B/pair")


if __name__ == "__main__":
    main()
