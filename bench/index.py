"""Benchmark: each FAISS index kind `ragtune index` can build, against exact search, in one run.

    python bench/index.py --squad runs/beir/embeddings      # after: ragtune embed -c configs/embed/squad-beir.yaml
    python bench/index.py --squad DIR --nb 50000 --kinds Flat,HNSW32

Two datasets, both queried with real SQuAD questions embedded by the same model (all-MiniLM-L6-v2):

- ``noisy``: ``--nb`` (200k) x 384 vectors with the structure of real embeddings: the real SQuAD paragraph
  vectors, each repeated with Gaussian noise that follows their covariance (the real spectrum), scaled so that
  a copy is as close to its source as a real paragraph is to its nearest real neighbour (mean cosine matched),
  then L2-normalised;
- ``squad``: the real SQuAD paragraph chunks embedded by ``ragtune embed`` (2,257 x 384).

Each index kind is built with the functions the index job's tasks use (train once, add, write the shard files,
open them with ``ShardedIndex``), in its own process so that its memory is its own: build time, memory (RSS the
process grew by while building) and disk size. Its search setting is tuned as the job tunes it, the cheapest
reaching recall@10 0.95, in both ways the job offers: on held-out database vectors (the default) and on 1,000
real questions (``index.tune_queries_path``). At each setting, on 1,000 other questions: recall@10 against exact
search, batched QPS (all queries in one call) and single-query QPS (one call per query), medians of 3 runs, with
their ratios to exact search (Flat) measured in the same run. Then 1 shard vs 4 shards of the same kind: the
fraction of identical results and the QPS ratio. Writes ``docs/img/index-recall-qps.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.schema.index import parse_bytes  # noqa: E402
from models.embedders import EmbedderSpec, load_sentence_transformer  # noqa: E402
from sharding.choice import choose_index, estimate_bytes, explicit_choice, nlist_for  # noqa: E402
from sharding.embeddings import EmbedderRecord, EmbeddingManifest, read_manifest, vectors_from_arrow  # noqa: E402
from sharding.faiss_index import (  # noqa: E402
    ShardBuilder,
    effective_factory,
    new_index,
    serialize,
    train_index,
    write_index_file,
)
from sharding.layout import plan_shards, shard_name  # noqa: E402
from sharding.manifest import (  # noqa: E402
    IndexManifest,
    ShardRecord,
    TrainedRecord,
    switch_latest,
    write_index_manifest,
)
from sharding.metrics import read_queries  # noqa: E402
from sharding.search import ShardedIndex  # noqa: E402
from sharding.storage import makedirs, resolve  # noqa: E402
from sharding.tuning import TuneRow, candidate_params, exact_knn, recall_at_k, tune  # noqa: E402

K = 10
TUNE_QUERIES = 1000
SINGLE_QUERIES = 200


# --- data ---------------------------------------------------------------------------------------------------------

def load_embeddings(path: Path) -> tuple[np.ndarray, EmbeddingManifest]:
    parts = sorted(path.glob("part-*.parquet"))
    if not parts:
        sys.exit(f"no embedding parts in {path}. Make them first: python -m jobs.embed --config "
                 "configs/embed/squad-beir.yaml corpus.path=../shared/data/squad/retrieval-v1.1/corpus.jsonl "
                 f"output.path={path}")
    xb = np.concatenate([vectors_from_arrow(pq.read_table(p, columns=["vector"])["vector"]) for p in parts])
    manifest = read_manifest(resolve(str(path)))
    if manifest is None:
        sys.exit(f"{path}: no embeddings manifest. Make the embeddings with `ragtune embed` (see above)")
    return xb, manifest


def repeat_with_noise(xr: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` normalised copies of the rows of ``xr`` with noise that follows their covariance, scaled so that a copy
    is as close to its source as a real row is to its nearest other row (mean cosine)."""
    rng = np.random.default_rng(seed)
    mu = xr.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xr - mu, rowvar=False))
    L = (evecs * np.sqrt(np.maximum(evals, 0))).astype(np.float32)  # z @ L.T has the covariance of xr
    nn_cos = float(exact_knn(xr, xr, 2, "inner_product")[0][:, 1].mean())
    z = rng.standard_normal((len(xr), xr.shape[1]), dtype=np.float32) @ L.T

    def mean_cos(sigma: float) -> float:
        y = xr + sigma * z
        return float(np.mean(np.sum(xr * y, 1) / np.linalg.norm(y, axis=1)))

    lo, hi = 0.0, 10.0  # mean_cos falls as sigma grows: bisect to the real nearest-neighbour cosine
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_cos(mid) > nn_cos else (lo, mid)
    sigma = (lo + hi) / 2
    out = np.empty((n, xr.shape[1]), np.float32)
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        src = xr[np.arange(i, i + m) % len(xr)]
        out[i:i + m] = src + sigma * (rng.standard_normal((m, xr.shape[1]), dtype=np.float32) @ L.T)
    print(f"noise: sigma {sigma:.3f} (copy-to-source cosine {mean_cos(sigma):.3f} = real nearest-neighbour cosine "
          f"{nn_cos:.3f})", flush=True)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def real_questions(manifest: EmbeddingManifest, n: int) -> np.ndarray:
    """``n`` SQuAD questions drawn at random, embedded with the embeddings' model."""
    qs = list(read_queries(REPO.parent / "shared/data/squad/retrieval-v1.1/queries.jsonl").values())
    qs = [qs[i] for i in np.random.default_rng(0).choice(len(qs), n, replace=False)]
    model = load_sentence_transformer(EmbedderSpec(**manifest.model.model_dump()))
    return model.encode(qs, batch_size=256, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


# --- one index kind, in its own process ---------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import faiss
    import psutil

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    data = Path(args.data)
    xb = np.load(data / "xb.npy")
    xq = np.load(data / "xq.npy")
    gt = np.load(data / "gt.npy")
    nb, d = xb.shape
    ids = np.arange(nb, dtype=np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(nb)
    held, pool = perm[:TUNE_QUERIES], perm[TUNE_QUERIES:]
    proc = psutil.Process()
    rss0 = proc.memory_info().rss

    t0 = time.perf_counter()
    factory = effective_factory(args.factory, d, "inner_product")
    index = new_index(factory, d, "inner_product")
    if not index.is_trained:
        xt = xb[np.sort(pool[:args.train])]
        train_index(index, xt)
        del xt
    blob = serialize(index)
    out_of_index = np.zeros(nb, dtype=bool)
    out_of_index[held] = True
    built, later = [], []  # as the job's shard tasks: held-out rows join after the tuning searches
    pieces = plan_shards([("xb", nb)], args.shards)
    for (p,) in pieces:
        rows = np.arange(p.start, p.stop)
        b = ShardBuilder(faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8)))
        b.add(ids[rows[~out_of_index[rows]]], xb[rows[~out_of_index[rows]]])
        built.append(b.finish())
        later.append(rows[out_of_index[rows]])
    build_s = time.perf_counter() - t0
    rss_build = proc.memory_info().rss - rss0  # the index as built (the held-out rows, 0.5%, join later)
    manifest = IndexManifest(version="v-00001", factory=factory, kind="bench", reason="bench", metric="inner_product",
                             dim=d, normalize=True, ntotal=nb, shards=[], model=EmbedderRecord(name="bench"),
                             trained=TrainedRecord(sha256="-") if "IVF" in factory else None)
    xt_q = np.load(data / "xq_tune.npy")
    kept = np.flatnonzero(~out_of_index)
    tunings = {"vectors": (ShardedIndex(resolve(str(data)), manifest, built), xb[held],
                           kept[exact_knn(xb[held], xb[kept], K, "inner_product")[1]]),
               "questions": (None, xt_q, exact_knn(xt_q, xb, K, "inner_product")[1])}

    root = resolve(str(data / f"index-{args.tag}"))
    vdir = root.join("v-00001")
    makedirs(vdir)

    out, measured = {}, {}
    for source, (tune_index, xt_queries, true) in tunings.items():
        if tune_index is None:  # the whole index, written and opened as the job's readers open it
            t0 = time.perf_counter()
            for shard, rows in zip(built, later, strict=True):
                shard.add_with_ids(xb[rows], ids[rows])
            records = []
            for s_i, (shard, (p,)) in enumerate(zip(built, pieces, strict=True)):
                sha, size = write_index_file(shard, vdir.join(shard_name(s_i)))
                records.append(ShardRecord(file=shard_name(s_i), ntotal=p.rows, sha256=sha, bytes=size,
                                           docstore="-", docstore_sha256="-", docstore_bytes=0, pieces=[p]))
            build_s += time.perf_counter() - t0
            write_index_manifest(vdir, manifest.model_copy(update={"shards": records}))
            switch_latest(root, "v-00001")
            tune_index = ShardedIndex.open(root.uri, mmap=False)
        rows = []
        for params in candidate_params(tune_index.shards[0]):
            tune_index.set_params(params)
            t = time.perf_counter()
            _, I = tune_index.search(xt_queries, K)
            rows.append(TuneRow(params, recall_at_k(I, true, K), len(xt_queries) / (time.perf_counter() - t)))
        chosen, reached = tune(rows, 0.95)
        out[source] = {"params": chosen.label(), "param_dict": chosen.params, "tune_recall": chosen.recall,
                       "reached": reached, "curve": [(r.label(), r.recall, r.qps) for r in rows]}
    index = tune_index
    for source, o in out.items():  # recall and speed on the measured questions, at each chosen setting
        if o["params"] not in measured:
            index.set_params(o["param_dict"])
            measured[o["params"]] = measure(index, xq, gt, data / f"I-{args.tag}-{source}.npy")
        o.update(measured[o["params"]])
    merged = None
    if args.shards > 1:  # the same shards merged into one in-memory index at open, where FAISS can
        index = ShardedIndex.open(root.uri, merge=True, params=out["vectors"]["param_dict"])
        if len(index.shards) == 1:
            merged = measure(index, xq, gt, data / f"I-{args.tag}-merged.npy")
    print("RESULT " + json.dumps({"factory": factory, "shards": args.shards, "build_s": build_s,
                                  "memory": rss_build, "disk": sum(r.bytes for r in records), "tuned": out,
                                  "merged": merged}))


def measure(index, xq: np.ndarray, gt: np.ndarray, ids_file: Path) -> dict:
    """Recall@10 against exact search, batched and single-query QPS (medians of 3); the ids go to a file."""
    batch, single = [], []
    for _ in range(3):
        t = time.perf_counter()
        _, I = index.search(xq, K)
        batch.append(len(xq) / (time.perf_counter() - t))
        t = time.perf_counter()
        for q in range(SINGLE_QUERIES):
            index.search(xq[q:q + 1], K)
        single.append(SINGLE_QUERIES / (time.perf_counter() - t))
    np.save(ids_file, I)
    return {"recall": recall_at_k(I, gt, K), "qps_batch": statistics.median(batch),
            "qps_single": statistics.median(single), "ids": ids_file.name}


def run_worker(data: Path, factory: str, shards: int, train: int, tag: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--data", str(data), "--factory", factory, "--shards", str(shards),
           "--train", str(train), "--tag", tag]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"worker {factory} x{shards} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("RESULT ", 1)[1])


# --- the run ------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--squad", default=str(REPO / "runs/beir/embeddings"), help="embedding folder of SQuAD")
    ap.add_argument("--nb", type=int, default=200_000, help="synthetic database size")
    ap.add_argument("--kinds", default="", help="comma-separated factory strings (default: the four kinds + auto)")
    ap.add_argument("--max-memory", default="4GiB", help="the budget auto chooses with")
    ap.add_argument("--plot", default=str(REPO / "docs/img/index-recall-qps.png"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--factory", help=argparse.SUPPRESS)
    ap.add_argument("--shards", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--train", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    xr, manifest = load_embeddings(Path(args.squad))
    budget = parse_bytes(args.max_memory)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    questions = real_questions(manifest, 2 * TUNE_QUERIES)  # half to tune on, half to measure
    datasets = {"noisy": repeat_with_noise(xr, args.nb, seed=1), "squad": xr}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, xb in datasets.items():
            nb, d = xb.shape
            data = Path(tmp) / name
            data.mkdir()
            xq = questions[TUNE_QUERIES:]
            np.save(data / "xb.npy", xb)
            np.save(data / "xq.npy", xq)
            np.save(data / "xq_tune.npy", questions[:TUNE_QUERIES])
            np.save(data / "gt.npy", exact_knn(xq, xb, K, "inner_product")[1])
            auto = choose_index(nb, d, budget)
            ivf = choose_index(nb, d, budget, use_gpu=True, exact_below=0)  # IVF-Flat: what GPUs would get
            pq = choose_index(nb, d, int(estimate_pq_budget(nb, d)), exact_below=0)  # IVF-PQ + refinement
            names = args.kinds.split(",") if args.kinds else ["Flat", "HNSW32", ivf.factory, pq.factory]
            kinds = {f: min(nb - TUNE_QUERIES, explicit_choice(f, nb, d).train_size) for f in names}
            print(f"\n{name}: {nb:,} x {d}; auto ({args.max_memory}) -> {auto.factory}: {auto.reason}", flush=True)
            rows = []
            for factory, train in kinds.items():
                for shards in (1, 4) if factory in ("Flat", "HNSW32", ivf.factory) else (1,):
                    r = run_worker(data, factory, shards, train, f"{len(rows)}")
                    r["auto"] = factory == auto.factory
                    rows.append(r)
                    for source, t in r["tuned"].items():
                        print(f"  {r['factory']} x{shards} (tuned on {source}): build {r['build_s']:.1f}s, "
                              f"{t['params']}, recall@10 {t['recall']:.3f}, {t['qps_batch']:,.0f} QPS batched, "
                              f"{t['qps_single']:,.0f} single", flush=True)
            for r in rows:  # 4 shards against 1, at the same setting when tuning chose the same one
                if r["shards"] == 4:
                    one = next(o for o in rows if o["factory"] == r["factory"] and o["shards"] == 1)
                    a, b = one["tuned"]["vectors"], r["tuned"]["vectors"]
                    r["vs_1"] = {"same_params": a["params"] == b["params"], "params": (a["params"], b["params"]),
                                 "identical": float((np.load(data / a["ids"]) == np.load(data / b["ids"])).mean()),
                                 "batch": b["qps_batch"] / a["qps_batch"], "single": b["qps_single"] / a["qps_single"]}
                    if r["merged"]:
                        m = r["merged"]
                        r["vs_1"]["merged"] = {
                            "identical": float((np.load(data / a["ids"]) == np.load(data / m["ids"])).mean()),
                            "batch": m["qps_batch"] / a["qps_batch"], "single": m["qps_single"] / a["qps_single"]}
            results[name] = rows
    report(results, args)


def estimate_pq_budget(nb: int, d: int) -> float:
    """A budget where IVF-Flat does not fit but IVF-PQ with refinement does: what a big corpus meets."""
    return 0.8 * estimate_bytes("ivf_flat", nb, d, nlist=nlist_for(nb))


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    mib = 2**20
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    for name, rows in results.items():
        base = next(r for r in rows if r["factory"] == "IDMap2,Flat" and r["shards"] == 1)["tuned"]["vectors"]
        print(f"\n### {name}\n")
        print("| index | shards | build (s) | memory (MiB) | disk (MiB) | tuned on | setting | recall@10 | "
              "QPS batched | x exact | QPS single | x exact |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for source, t in r["tuned"].items():
                if source == "questions" and r["shards"] == 4:
                    continue
                auto = " (auto)" if r["auto"] else ""
                print(f"| {r['factory']}{auto} | {r['shards']} | {r['build_s']:.1f} | {r['memory'] / mib:.0f} | "
                      f"{r['disk'] / mib:.0f} | {source} | {t['params']} | {t['recall']:.3f} | "
                      f"{t['qps_batch']:,.0f} | {t['qps_batch'] / base['qps_batch']:.1f}x | {t['qps_single']:,.0f} | "
                      f"{t['qps_single'] / base['qps_single']:.1f}x |")
        sharded = [r for r in rows if "vs_1" in r]
        if sharded:
            print("\n| index | 4 shards searched | setting (1 / 4 shards) | identical ids | QPS batched 4 vs 1 | "
                  "QPS single 4 vs 1 |")
            print("|---|---|---|---|---|---|")
            for r in sharded:
                v = r["vs_1"]
                print(f"| {r['factory']} | apart, merged top-k | {v['params'][0]} / {v['params'][1]} | "
                      f"{100 * v['identical']:.2f}% | {v['batch']:.2f}x | {v['single']:.2f}x |")
                if "merged" in v:
                    m = v["merged"]
                    print(f"| {r['factory']} | merged at open | {v['params'][0]} | {100 * m['identical']:.2f}% | "
                          f"{m['batch']:.2f}x | {m['single']:.2f}x |")
    plot(results, Path(args.plot))


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (name, rows) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for r in rows:
            if r["shards"] != 1:
                continue
            curve = r["tuned"]["questions"]["curve"]
            ax.plot([c[2] for c in curve], [c[1] for c in curve], "o-", ms=3,
                    label=r["factory"] + (" (auto)" if r["auto"] else ""))
        ax.axhline(0.95, ls="--", color="gray", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("QPS, batched")
        ax.set_ylabel("recall@10 vs exact (real questions)")
        ax.set_title(f"{name}: each search setting tried", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
