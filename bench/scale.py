"""Benchmark (not a test): ragtune's jobs at growing corpus sizes, memory bounded by part and shard size, not by N.

    python bench/scale.py --sizes 62500,250000,1000000 --work runs/scale               # index side + 1M-chunk embed
    python bench/scale.py --sizes 625000,2500000,10000000 --shard-size 625000 --work /big/scale   # the 10M run
    python bench/scale.py --sizes 20000,80000,320000 --part-rows 20000 --embed-chunks 50000 --work /tmp/s  # smoke

Index side, at each size N (the sizes should span at least 16x): synthetic embedding parts written directly in the
embed job's format (``sharding.embeddings``: part tables, ``write_part``, a manifest in state done), part by part,
so the generator holds one part at a time. The vectors are d=384, L2-normalised, drawn from a Gaussian mixture in
a 32-dimensional latent space mapped into 384 dimensions (clustered, so that IVF recall means something); each
chunk has a short synthetic text (words of the MiniLM vocabulary, topical per cluster) so that BM25 shards are
built. The parts are shared between sizes (a smaller size is a prefix of the larger, by symlinks). Then the index
job runs as a user runs it (``python -m jobs.index --config <yaml>``, embedded local Ray, lexical on) with the
same factory string at every size (what ``sharding.choice.choose_index`` picks for the largest size under
``--max-memory`` on one node, or ``--kind``) and shards of ``--shard-size`` vectors (shards proportional to N).

Measured per size, each measured side in its own process so that its memory is its own: the job's wall time and
build seconds per million chunks (the build window: from the first Ray worker to the job's exit, imports and Ray's
start left out); machine-wide CPU utilisation over that window (``psutil.cpu_times``, every process on the
machine: Ray's and anyone else's) and the job's own share (its process tree's CPU time); peak anonymous memory
(``RssAnon`` of ``/proc/<pid>/status``, sampled every 0.2 s: file pages of mmapped shards do not count) of the
driver, of the largest Ray task or actor process, and of Ray's own processes; then a replica that holds shards (a
process that opens ``--replica-shards`` shards of the version as ``serving.deployments.ShardSearcher`` does in the
split layout: ``ShardedIndex.open(..., mmap=True, only=<group>, lease="ShardSearcher")`` and its BM25 shards, and
answers dense and lexical queries); the index's disk size (FAISS, BM25, docstore); and, in another process that
opens the whole version, recall@10 at the setting the job tuned against exact search (exact top-10 computed while
the parts are written, ``sharding.tuning.GroundTruth``) and QPS, batched and one query at a time (medians of 3).

Embed side (``--embed-chunks``, >= 1M in the real run; ``--skip-embed`` to leave it out): a synthetic JSONL corpus
of that many chunks, the real tokenizer and chunker (all-MiniLM-L6-v2's), and a STAND-IN encoder: a one-layer BERT
of width 32 with mean pooling, built here and saved as a sentence-transformers folder, given as ``embed.model`` so
it goes through the real loading path. It measures the pipeline (read, chunk, encode, write, the actors' balance),
not a model: the model's own throughput is ``bench/embed.py``'s job. Measured: wall time, machine-wide CPU
utilisation over the embedding stage (while the ``PartEmbedder`` actors live), parts per actor (the job's
summary), peak RssAnon of the driver and the actors.

Printed: a Markdown table per side, the targets as PASS/FAIL lines (peak anonymous memory of each kind of process
<= 1.25x from the smallest to the largest size; build s/M within +-25% of the median across sizes; the embed stage
>= 85% of the cores busy), and a projection for 100M and 1B chunks from the measured per-shard figures. Written
under ``--work``: ``scale.json`` (every number, so docs/scale.md can be regenerated) and ``scale.png`` (memory and
s/M against N). On a machine shared with other jobs the CPU and time figures are theirs too: the load average at
the start and the end is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.schema.index import parse_bytes  # noqa: E402
from models.embedders import resolve_embedder  # noqa: E402
from sharding.choice import choose_index, human_bytes, nlist_for  # noqa: E402
from sharding.embeddings import (  # noqa: E402
    CHUNK_SCHEMA,
    EmbedderRecord,
    EmbeddingManifest,
    PartCounts,
    PartRecord,
    part_name,
    part_table,
    read_manifest,
    read_part_records,
    write_manifest,
    write_part,
    write_part_record,
)
from sharding.ids import chunk_id  # noqa: E402
from sharding.storage import resolve  # noqa: E402
from sharding.tuning import RECALL_K as K  # noqa: E402
from sharding.tuning import GroundTruth, exact_knn, recall_at_k  # noqa: E402

D = 384
NQ = 1000  # queries for recall and batched QPS
SINGLE = 200  # queries sent one at a time
MIB = 2**20
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
BASE_MODEL = "all-MiniLM-L6-v2"  # its tokenizer chunks the embed side's corpus; its vocabulary makes the texts


# --- synthetic data -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mixture:
    """Clustered unit vectors: cluster centres in a ``latent``-dimensional space, each point its centre plus
    Gaussian spread, mapped into ``d`` dimensions by a fixed random matrix, plus a little isotropic noise, then
    L2-normalised. Row ``i`` of part ``p`` depends only on (seed, p, rows): any process regenerates it."""

    d: int = D
    clusters: int = 1000
    latent: int = 32
    spread: float = 0.5  # within-cluster standard deviation in the latent space (centres are N(0, 1))
    noise: float = 0.1  # isotropic noise per full-space coordinate, relative to the mapped point's scale
    words_per_text: int = 16
    seed: int = 0

    def key(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=6).hexdigest()

    def _fixed(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not hasattr(self, "_cache"):
            rng = np.random.default_rng([self.seed, 0])
            mu = rng.standard_normal((self.clusters, self.latent)).astype(np.float32)
            P = (rng.standard_normal((self.latent, self.d)) / math.sqrt(self.latent)).astype(np.float32)
            w = rng.dirichlet(np.ones(self.clusters))
            vocab = vocabulary()
            topics = rng.integers(0, len(vocab), (self.clusters, 24))  # each cluster's own words
            object.__setattr__(self, "_cache", (mu, P, w, vocab, topics))
        return self._cache  # type: ignore[attr-defined]

    def vectors(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) float32 unit vectors and their (n,) cluster numbers."""
        mu, P, w, _, _ = self._fixed()
        k = rng.choice(self.clusters, n, p=w)
        z = mu[k] + self.spread * rng.standard_normal((n, self.latent), dtype=np.float32)
        x = z @ P
        x += self.noise * rng.standard_normal((n, self.d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, k

    def texts(self, rng: np.random.Generator, k: np.ndarray, n_words: int) -> list[str]:
        """Half the words from each row's cluster, half Zipf-distributed over the whole vocabulary."""
        _, _, _, vocab, topics = self._fixed()
        half = n_words // 2
        topical = topics[k[:, None], rng.integers(0, topics.shape[1], (len(k), half))]
        common = (rng.zipf(1.3, (len(k), n_words - half)) - 1) % len(vocab)
        words = vocab[np.concatenate([topical, common], axis=1)]
        return [" ".join(r) for r in words.tolist()]

    def part(self, index: int, rows: int, first_row: int) -> tuple[pa.Table, np.ndarray]:
        """One embedding part of ``rows`` chunks (rows ``first_row``...), as the embed job writes it: the rows
        sorted by chunk id, without the routing columns, and the vectors."""
        rng = np.random.default_rng([self.seed, 1, index, rows])
        xb, k = self.vectors(rng, rows)
        texts = self.texts(rng, k, self.words_per_text)
        titles = self.texts(rng, k, 2)
        doc_ids = [f"s{first_row + i}" for i in range(rows)]
        fp = f"bench-scale-{self.key()}"
        ids = np.fromiter((chunk_id(doc, 0, fp) for doc in doc_ids), dtype=np.int64, count=rows)
        order = np.argsort(ids, kind="stable")  # parts are sorted by chunk id (sharding.embeddings.prepare_part)
        cols = {"chunk_id": ids[order], "doc_id": [doc_ids[i] for i in order],
                "chunk_index": np.zeros(rows, np.int32), "title": [titles[i] for i in order],
                "text": [texts[i] for i in order], "metadata": ["{}"] * rows,
                "n_tokens": np.full(rows, self.words_per_text + 4, np.int32), "key": np.zeros(rows, np.int64),
                "part": np.full(rows, index, np.int32)}
        return pa.table(cols, schema=CHUNK_SCHEMA), xb[order]

    def queries(self, n: int) -> tuple[np.ndarray, list[str]]:
        """``n`` query vectors from the same mixture (not in any part) and a few words of their clusters each."""
        rng = np.random.default_rng([self.seed, 2])
        xq, k = self.vectors(rng, n)
        return xq, self.texts(rng, k, 4)


_VOCAB: np.ndarray | None = None


def vocabulary() -> np.ndarray:
    """Whole words of the MiniLM WordPiece vocabulary (each one token to its tokenizer), else made-up syllables."""
    global _VOCAB
    if _VOCAB is None:
        path = Path(resolve_embedder(BASE_MODEL).path) / "vocab.txt"
        words = [w for w in path.read_text().split("\n") if w.isalpha() and w.islower() and len(w) >= 3] \
            if path.is_file() else []
        if len(words) < 5000:
            syl = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
            words = [a + b + c for a in syl for b in syl[:20] for c in syl[:10]]
        _VOCAB = np.array(words, dtype=object)
    return _VOCAB


# --- the embedding parts of each size (shared: a smaller size is a prefix of the larger) -------------------------

PROVENANCE = {"model": "synthetic", "model_revision": "bench-scale", "chunker": "none"}


def write_sizes(mix: Mixture, sizes: list[int], part_rows: int, work: Path, xq: np.ndarray) -> dict[int, Path]:
    """Write the parts of every size once (a pool of full parts, plus a shorter last part per size where N is not
    a multiple of ``part_rows``), one part in memory at a time, and each size's folder: its parts (symlinks into
    the pool) and a manifest in state done. The exact top-k of ``xq`` per size is computed on the way
    (``<folder>/gt.npy``). Parts and ground truth already there (same mixture, same part size) are reused."""
    pool = resolve(str(work / f"parts-{mix.key()}-{part_rows}"))
    Path(pool.path).mkdir(parents=True, exist_ok=True)
    folders = {n: work / f"n{n}" / "embeddings" for n in sizes}
    todo = [n for n in sizes if not (folders[n] / "gt.npy").is_file() or read_manifest(resolve(str(folders[n])))
            is None]
    truths = {n: GroundTruth(xq, K, "inner_product") for n in todo}
    records = read_part_records(pool)
    full_parts = max(n // part_rows for n in sizes)
    t0, rows_done = time.perf_counter(), 0
    for p in range(full_parts):
        need = [n for n in todo if (p + 1) * part_rows <= n]
        have = p in records and (Path(pool.path) / part_name(p)).is_file()
        if have and not need:
            continue
        if have:
            t = pq.read_table(Path(pool.path) / part_name(p), columns=["chunk_id", "vector"])
            ids, xb = t["chunk_id"].to_numpy(), vectors_of(t)
        else:
            rows, xb = mix.part(p, part_rows, p * part_rows)
            ids = rows["chunk_id"].to_numpy()
            rec = write_part(part_table(rows, xb, PROVENANCE), pool, p, embedded=part_rows,
                             counts=PartCounts(docs=part_rows))
            write_part_record(pool, p, rec)
            records[p] = rec
        add_truth([truths[n] for n in need], xq, ids, xb)
        rows_done += part_rows
        print(f"  part {p + 1}/{full_parts} ({rows_done / (time.perf_counter() - t0):,.0f} rows/s)", flush=True)
    for n in sizes:
        folder = folders[n]
        folder.mkdir(parents=True, exist_ok=True)
        parts: dict[str, PartRecord] = {}
        for p in range(n // part_rows):
            link = folder / part_name(p)
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to(Path(os.path.relpath(Path(pool.path) / part_name(p), folder)))
            parts[f"{p:05d}"] = records[p]
        tail = n % part_rows
        if tail:  # the last part of this size alone
            p = n // part_rows
            rows, xb = mix.part(p, tail, p * part_rows)
            out = resolve(str(folder))
            (folder / part_name(p)).unlink(missing_ok=True)
            parts[f"{p:05d}"] = write_part(part_table(rows, xb, PROVENANCE), out, p, embedded=tail,
                                           counts=PartCounts(docs=tail))
            if n in truths:
                add_truth([truths[n]], xq, rows["chunk_id"].to_numpy(), xb)
        manifest = EmbeddingManifest(
            state="done", model=EmbedderRecord(name="synthetic", revision=f"bench-scale-{mix.key()}"), dim=mix.d,
            normalize=True, metric="inner_product", chunker=None, num_parts=len(parts), parts=parts,
            corpus={"paths": ["synthetic (bench/scale.py)"], "fingerprint": f"{mix.key()}-{part_rows}-{n}",
                    "files": 0, "bytes": 0, "generator": asdict(mix)},
            stats={"chunks": n, "parts": len(parts)})
        write_manifest(resolve(str(folder)), manifest)
        if n in truths:
            np.save(folder / "gt.npy", truths[n].result()[1])
    return folders


def vectors_of(t: pa.Table) -> np.ndarray:
    col = t["vector"].combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def add_truth(truths: list[GroundTruth], xq: np.ndarray, ids: np.ndarray, xb: np.ndarray) -> None:
    """One block's exact top-k, computed once and added to every size's ground truth that holds the block."""
    if not truths:
        return
    Dk, Ik = exact_knn(xq, xb, K, "inner_product")
    Ik = np.where(Ik >= 0, ids[np.maximum(Ik, 0)], -1)
    for t in truths:
        t.add_result(Dk, Ik)


# --- measuring a process tree -------------------------------------------------------------------------------------

def rss_anon(pid: int) -> int:
    """Anonymous resident memory of a process in bytes (heap, stacks; not mmapped files), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def title_of(p: Any) -> str:
    """``ray::build_shard``-style title of a Ray worker (its proctitle), else the executable's name."""
    import psutil

    try:
        cmd = " ".join(p.cmdline()).strip()
    except psutil.Error:
        return "?"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    return Path(cmd.split()[0]).name if cmd else "?"


class Monitor(threading.Thread):
    """Samples a process and its descendants every ``interval`` seconds until it exits.

    Per sample: each process's RssAnon and title, the tree's CPU seconds (each process's last reading summed:
    a process that exits between samples loses at most one interval), the machine's CPU times. Roles: the
    ``driver`` (the root), ``task`` (titles ``ray::...``: Ray task and actor workers) and ``ray`` (Ray's own
    processes: gcs_server, raylet, dashboard, ...)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: dict[str, tuple[int, str]] = {"driver": (0, ""), "task": (0, ""), "ray": (0, "")}
        self.by_title: dict[str, int] = {}
        self.seen: dict[str, tuple[float, float]] = {}  # title -> (first, last) time it was present
        self.samples: list[tuple[float, float, float, float]] = []  # (t, machine busy s, machine total s, tree cpu s)
        self._cpu: dict[int, float] = {}

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while True:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            t = time.time()  # wall clock: comparable with the times the jobs write into their manifests
            for p in procs:
                anon = rss_anon(p.pid)
                title = "driver" if p.pid == self.pid else title_of(p)
                role = "driver" if p.pid == self.pid else "task" if title.startswith("ray::") else "ray"
                if anon > self.peak[role][0]:
                    self.peak[role] = (anon, title)
                self.by_title[title] = max(self.by_title.get(title, 0), anon)
                first, _ = self.seen.get(title, (t, t))
                self.seen[title] = (first, t)
                try:
                    c = p.cpu_times()
                    self._cpu[p.pid] = c.user + c.system
                except psutil.Error:
                    pass
            m = psutil.cpu_times()
            total = sum(m)
            self.samples.append((t, total - m.idle - getattr(m, "iowait", 0.0), total, sum(self._cpu.values())))
            if not root.is_running() or root.status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(self.interval)

    def window(self, match: str, but: str = "\0") -> tuple[float, float] | None:
        """(first, last) time a process whose title contains ``match`` (and not ``but``) was present."""
        spans = [span for title, span in self.seen.items() if match in title and but not in title]
        return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None

    def cpu(self, t0: float, t1: float) -> tuple[float, float]:
        """(machine busy fraction of all cores, this tree's CPU seconds / (seconds x cores)) between two times."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples[-1:]
        a, b = inside[0], inside[-1]
        cores = os.cpu_count() or 1
        if b[0] <= a[0] or b[2] <= a[2]:
            return float("nan"), float("nan")
        return (b[1] - a[1]) / (b[2] - a[2]), (b[3] - a[3]) / ((b[0] - a[0]) * cores)


def run_measured(cmd: list[str], log: Path) -> tuple[str, float, Monitor, float]:
    """Run a command (its stderr to ``log``) under a Monitor: (stdout, wall seconds, monitor, start time.time())."""
    t0, start = time.perf_counter(), time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        mon = Monitor(proc.pid)
        mon.start()
        stdout, _ = proc.communicate()
    mon.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-4000:]}")
    return stdout, wall, mon, start


def write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    path.write_text(f"# written by bench/scale.py; run with: python -m jobs.{path.stem} --config {path}\n"
                    + yaml.safe_dump(cfg, sort_keys=False))


# --- the index side -----------------------------------------------------------------------------------------------

def build_index(n: int, emb: Path, factory: str, shards: int, work: Path) -> dict:
    """``python -m jobs.index`` on one size, measured."""
    root = work / f"n{n}" / "index"
    shutil.rmtree(root, ignore_errors=True)
    cfg_path = work / f"n{n}" / "index.yaml"
    write_yaml(cfg_path, {"embeddings": {"path": str(emb)},
                          "index": {"path": str(root), "kind": factory, "shards": shards,
                                    "lexical": {"enabled": True}}})
    out, wall, mon, t0 = run_measured([sys.executable, "-m", "jobs.index", "--config", str(cfg_path)],
                                      work / f"n{n}" / "index.log")
    summary = json.loads(out.strip().splitlines()[-1])
    vdir = Path(summary["path"].removeprefix("file://")) / summary["version"]
    # the build window: from the first Ray task at work (imports, Ray's start and its idle workers' start are
    # behind) to the version's manifest (tasks, tuning and the driver's merges done; Ray's shutdown left out)
    started = mon.window("ray::", but="IDLE")
    t_build = started[0] if started else t0
    created = json.loads((vdir / "manifest.json").read_text()).get("created_at")
    t_end = float(created) if created else t0 + wall
    machine, own = mon.cpu(t_build, t_end)
    return {"n": n, "shards": summary["shards"], "factory": summary["factory"], "wall_s": wall,
            "build_s": t_end - t_build, "s_per_m": (t_end - t_build) / (n / 1e6), "cpu_machine": machine,
            "cpu_job": own, "driver": mon.peak["driver"][0], "task": mon.peak["task"][0],
            "task_title": mon.peak["task"][1], "ray_own": mon.peak["ray"][0], "ray_own_title": mon.peak["ray"][1],
            "by_title": mon.by_title, "disk": disk_of(vdir), "tuned": summary["search_params"],
            "tune_recall": summary["recall"], "version": str(vdir)}


def disk_of(vdir: Path) -> dict[str, int]:
    """Bytes of a version folder by what they hold, found by listing it (a folder's name, or a top-level file's
    kind): ``faiss`` (*.faiss / *.index files), ``lexical`` (BM25), ``docstore``, ``other``; and ``total``."""
    out = {"faiss": 0, "lexical": 0, "docstore": 0, "other": 0}
    for dirpath, _, files in os.walk(vdir):
        rel = Path(dirpath).relative_to(vdir).parts
        for f in files:
            size = (Path(dirpath) / f).stat().st_size
            top = rel[0] if rel else ""
            if "lexical" in top or "bm25" in top:
                out["lexical"] += size
            elif "docstore" in top:
                out["docstore"] += size
            elif not rel and f.endswith((".faiss", ".index", ".ivfdata")) and not f.startswith("trained"):
                out["faiss"] += size
            else:
                out["other"] += size
    out["total"] = sum(out.values())
    return out


def replica_worker(args: argparse.Namespace) -> None:
    """A replica of a shard group in the split layout: its shards opened as ShardSearcher opens them (mmapped,
    checked, leased, BM25 shards loaded), then queried, dense and lexical."""
    import faiss

    from cluster.placement import shard_groups
    from sharding.manifest import read_index_manifest
    from sharding.search import ShardedIndex

    base = rss_anon(os.getpid())  # the interpreter, numpy, FAISS: what every replica costs before any shard
    vdir = resolve(args.index)
    manifest = read_index_manifest(vdir)
    n = len(manifest.shards)
    group = shard_groups(n, max(1, n // min(args.replica_shards, n)))[0]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    index = ShardedIndex.open(vdir.uri, verify=True, mmap=True, params={}, only=group, lease="ShardSearcher")
    index.lexical_shards()
    open_s = time.perf_counter() - t0
    xq = np.load(args.queries)
    texts = json.loads(Path(args.texts).read_text())
    t0 = time.perf_counter()
    index.search(xq, K)
    for q in range(SINGLE):
        index.search(xq[q:q + 1], K)
    index.search_lexical(texts, K)
    print("RESULT " + json.dumps({"shards": group, "ntotal": index.ntotal, "open_s": open_s, "base": base,
                                  "query_s": time.perf_counter() - t0}))


def search_worker(args: argparse.Namespace) -> None:
    """The whole version in one process (mmapped): recall@10 at the tuned setting against exact search, QPS
    batched and one query at a time, BM25 QPS batched; medians of 3."""
    import faiss

    from sharding.search import ShardedIndex

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index = ShardedIndex.open(args.index, verify=False, mmap=True)
    xq, gt = np.load(args.queries), np.load(args.gt)
    texts = json.loads(Path(args.texts).read_text())
    batch, single, lexical = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        _, I = index.search(xq, K)
        batch.append(len(xq) / (time.perf_counter() - t))
        t = time.perf_counter()
        for q in range(SINGLE):
            index.search(xq[q:q + 1], K)
        single.append(SINGLE / (time.perf_counter() - t))
        t = time.perf_counter()
        index.search_lexical(texts, K)
        lexical.append(len(texts) / (time.perf_counter() - t))
    print("RESULT " + json.dumps({"recall": recall_at_k(I, gt, K), "qps_batch": statistics.median(batch),
                                  "qps_single": statistics.median(single),
                                  "qps_lexical": statistics.median(lexical), "params": index.params}))


def run_worker(kind: str, work: Path, n: int, extra: list[str]) -> tuple[dict, int]:
    out, _, mon, _ = run_measured([sys.executable, __file__, "--worker", kind, *extra], work / f"n{n}" / f"{kind}.log")
    return json.loads(out.split("RESULT ", 1)[1]), mon.peak["driver"][0]


# --- the embed side -----------------------------------------------------------------------------------------------

def stand_in_encoder(folder: Path) -> Path:
    """A one-layer BERT of width 32 with mean pooling and MiniLM's tokenizer, saved as a sentence-transformers
    folder: cheap enough that the pipeline, not the model, is measured."""
    if (folder / "modules.json").is_file():
        return folder
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    spec = resolve_embedder(BASE_MODEL)
    tok = AutoTokenizer.from_pretrained(spec.path)
    torch.manual_seed(0)
    hf = folder.parent / (folder.name + "-hf")
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(hf)
    tok.save_pretrained(hf)
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    word = Transformer(str(hf), max_seq_length=spec.max_seq_length)
    SentenceTransformer(modules=[word, Pooling(32, pooling_mode="mean")], device="cpu").save(str(folder))
    shutil.rmtree(hf)
    return folder


def write_corpus(path: Path, chunks: int, size: int, overlap: int, mix: Mixture) -> int:
    """A JSONL corpus that the real chunker cuts into about ``chunks`` chunks of ``size`` tokens; returns its
    documents. Written in blocks (bounded memory); kept when already there."""
    from models.embedders import load_tokenizer
    from sharding.chunking import Chunker

    words = 3 * size  # about 3 chunks a document
    rng = np.random.default_rng([mix.seed, 3])
    ks = rng.integers(0, mix.clusters, 64)
    chunker = Chunker(load_tokenizer(resolve_embedder(BASE_MODEL).path), size, overlap)
    sample = mix.texts(rng, ks, words)
    per_doc = statistics.mean(len(chunker.chunk(t, "title words")) for t in sample)
    docs = math.ceil(chunks / per_doc)
    marker = path.with_suffix(".done")
    if marker.is_file() and marker.read_text() == str(docs):
        return docs
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for start in range(0, docs, 10_000):
            m = min(10_000, docs - start)
            k = rng.integers(0, mix.clusters, m)
            texts, titles = mix.texts(rng, k, words), mix.texts(rng, k, 2)
            f.write("".join(json.dumps({"_id": f"doc{start + i}", "title": titles[i], "text": texts[i]}) + "\n"
                            for i in range(m)))
    tmp.rename(path)
    marker.write_text(str(docs))
    return docs


def run_embed(chunks: int, work: Path, mix: Mixture, size: int, overlap: int) -> dict:
    folder = work / f"embed-{chunks}"
    folder.mkdir(parents=True, exist_ok=True)
    model = stand_in_encoder(work / "stand-in-encoder")
    corpus = folder / "corpus.jsonl"
    docs = write_corpus(corpus, chunks, size, overlap, mix)
    out = folder / "embeddings"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = folder / "embed.yaml"
    write_yaml(cfg_path, {"corpus": {"path": str(corpus), "id_field": "_id", "title_field": "title"},
                          "chunk": {"size": size, "overlap": overlap}, "embed": {"model": str(model)},
                          "output": {"path": str(out)}})
    stdout, wall, mon, t0 = run_measured([sys.executable, "-m", "jobs.embed", "--config", str(cfg_path)],
                                         folder / "embed.log")
    summary = json.loads(stdout.strip().splitlines()[-1])
    stage = mon.window("PartEmbedder") or (t0, t0 + wall)
    machine, own = mon.cpu(*stage)
    actor = max((v for t, v in mon.by_title.items() if "PartEmbedder" in t), default=0)
    return {"chunks": summary["chunks"], "docs": docs, "parts": summary["parts"], "actors": summary["actors"],
            "parts_per_actor": summary["parts_per_actor"], "wall_s": wall, "stage_s": stage[1] - stage[0],
            "chunks_per_s_stage": summary["chunks"] / max(stage[1] - stage[0], 1e-9), "cpu_machine": machine,
            "cpu_job": own, "driver": mon.peak["driver"][0], "actor": actor, "task": mon.peak["task"][0],
            "task_title": mon.peak["task"][1], "ray_own": mon.peak["ray"][0], "by_title": mon.by_title}


# --- the run ------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="62500,250000,1000000", help="chunks per size, comma-separated (>= 16x span)")
    ap.add_argument("--work", help="folder for parts, indexes, logs, scale.json and scale.png")
    ap.add_argument("--shard-size", type=int, help="vectors per index shard at every size (default: the smallest "
                                                   "size, so it has one shard)")
    ap.add_argument("--part-rows", type=int, default=100_000, help="chunks per embedding part")
    ap.add_argument("--max-memory", default="4GiB", help="the budget choose_index picks the largest size's index with "
                                                         "(index.max_memory's default)")
    ap.add_argument("--kind", help="a factory string for every size instead of choose_index's")
    ap.add_argument("--replica-shards", type=int, default=1, help="shards one serving replica holds (its group)")
    ap.add_argument("--embed-chunks", default="1000000", help="chunks of the embed side (comma-separated for several)")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--chunk-overlap", type=int, default=16)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--node-memory", default="64GiB", help="per-node memory budget of the projection")
    ap.add_argument("--report", metavar="JSON", help="print the tables, targets and projection of a scale.json "
                                                     "again (and rewrite its plot), without measuring")
    ap.add_argument("--worker", choices=["replica", "search"], help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--queries", help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    ap.add_argument("--gt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "replica":
        replica_worker(args)
        return
    if args.worker == "search":
        search_worker(args)
        return

    if args.report:
        res = json.loads(Path(args.report).read_text())
        report(res, parse_bytes(args.node_memory))
        return
    if not args.work:
        ap.error("--work is required: the folder for parts, indexes, logs and results")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mix = Mixture()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.2f} at start (other jobs' load counts in the "
          "machine-wide CPU figures)", flush=True)
    if sizes[-1] < 16 * sizes[0]:
        print(f"WARNING: sizes span {sizes[-1] / sizes[0]:.1f}x; the issue asks for at least 16x", flush=True)
    results: dict[str, Any] = {"args": vars(args), "cores": cores, "load_start": os.getloadavg()[0],
                               "mixture": asdict(mix), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "index": [], "embed": []}
    if not args.skip_index:
        shard_size = args.shard_size or sizes[0]
        choice = None if args.kind else choose_index(sizes[-1], D, parse_bytes(args.max_memory))
        factory = args.kind or choice.factory  # type: ignore[union-attr]
        results.update(factory=factory, shard_size=shard_size, part_rows=args.part_rows,
                       reason=choice.reason if choice else "given as --kind")
        print(f"index: {factory} at every size ({results['reason']}); shards of {shard_size:,} vectors; parts of "
              f"{args.part_rows:,} chunks", flush=True)
        xq, texts = mix.queries(NQ)
        np.save(work / "xq.npy", xq)
        (work / "texts.json").write_text(json.dumps(texts))
        t = time.perf_counter()
        folders = write_sizes(mix, sizes, args.part_rows, work, xq)
        print(f"parts and exact top-{K} of every size: {time.perf_counter() - t:.0f}s", flush=True)
        for n in sizes:
            shards = max(1, round(n / shard_size))
            r = build_index(n, folders[n], factory, shards, work)
            common = ["--index", r["version"], "--queries", str(work / "xq.npy"), "--texts", str(work / "texts.json")]
            rep, r["replica"] = run_worker("replica", work, n, [*common, "--replica-shards", str(args.replica_shards)])
            r["replica_shards"], r["replica_base"], r["replica_open_s"] = len(rep["shards"]), rep["base"], rep["open_s"]
            s, r["searcher"] = run_worker("search", work, n, [*common, "--gt", str(folders[n] / "gt.npy")])
            r.update(s)
            results["index"].append(r)
            print(f"  {n:,}: {r['shards']} shards, build {r['build_s']:.1f}s ({r['s_per_m']:.1f} s/M), driver "
                  f"{r['driver'] / MIB:.0f} MiB, largest task {r['task'] / MIB:.0f} MiB ({r['task_title']}), replica "
                  f"{r['replica'] / MIB:.0f} MiB, recall@10 {r['recall']:.3f}, {r['qps_batch']:,.0f} QPS", flush=True)
    if not args.skip_embed:
        for c in sorted(int(x) for x in args.embed_chunks.split(",")):
            e = run_embed(c, work, mix, args.chunk_size, args.chunk_overlap)
            results["embed"].append(e)
            print(f"  embed {e['chunks']:,} chunks: {e['wall_s']:.0f}s, stage {e['stage_s']:.0f}s, CPU "
                  f"{100 * e['cpu_machine']:.0f}% machine-wide, parts per actor {e['parts_per_actor']}", flush=True)
    results["load_end"] = os.getloadavg()[0]
    report(results, parse_bytes(args.node_memory))
    (work / "scale.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {work / 'scale.json'}")


def growth(values: list[float]) -> float:
    return values[-1] / values[0] if values and values[0] else float("nan")


def report(res: dict, node_memory: int) -> None:
    rows, emb = res["index"], res["embed"]
    targets: list[tuple[str, bool, str]] = []
    print(f"\nload average: {res['load_start']:.2f} at the start, {res['load_end']:.2f} at the end "
          f"({res['cores']} cores, shared with other jobs: the CPU and time figures are theirs too)")
    if rows:
        med = statistics.median(r["s_per_m"] for r in rows)
        print(f"\n### Index build and search ({res['factory']} at every size, shards of {res['shard_size']:,}, "
              f"BM25 on)\n")
        print("| chunks | shards | wall (s) | build (s) | s/M | x median | CPU machine | CPU job | driver (MiB) | "
              "largest task (MiB) | Ray's own (MiB) | replica (MiB) | searcher, all shards (MiB) | disk (MiB) "
              "FAISS/BM25/docstore | setting | recall@10 | QPS batched | QPS single | BM25 QPS |")
        print("|" + "---|" * 19)
        for r in rows:
            dk = r["disk"]
            setting = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "exact"
            print(f"| {r['n']:,} | {r['shards']} | {r['wall_s']:.1f} | {r['build_s']:.1f} | {r['s_per_m']:.1f} | "
                  f"{r['s_per_m'] / med:.2f}x | {100 * r['cpu_machine']:.0f}% | {100 * r['cpu_job']:.0f}% | "
                  f"{r['driver'] / MIB:.0f} | {r['task'] / MIB:.0f} ({r['task_title']}) | {r['ray_own'] / MIB:.0f} | "
                  f"{r['replica'] / MIB:.0f} | {r['searcher'] / MIB:.0f} | "
                  f"{dk['total'] / MIB:.0f} ({dk['faiss'] / MIB:.0f}/"
                  f"{dk['lexical'] / MIB:.0f}/{dk['docstore'] / MIB:.0f}) | {setting} | {r['recall']:.3f} | "
                  f"{r['qps_batch']:,.0f} | {r['qps_single']:,.0f} | {r['qps_lexical']:,.0f} |")
        for key, name in (("driver", "index driver"), ("task", "largest index task"), ("replica", "replica")):
            g = growth([r[key] for r in rows])
            targets.append((f"peak anonymous memory of the {name} grows {g:.2f}x from {rows[0]['n']:,} to "
                            f"{rows[-1]['n']:,} chunks (<= 1.25x)", g <= 1.25, name))
        kinds = sorted({t for r in rows for t in r["by_title"] if t.startswith("ray::") and "IDLE" not in t})
        print("\nPeak RssAnon by Ray task or actor kind (MiB; the title a worker had while sampled):\n")
        print("| process | " + " | ".join(f"{r['n']:,}" for r in rows) + " | growth |")
        print("|" + "---|" * (len(rows) + 2))
        for t in kinds:
            vals = [r["by_title"].get(t, 0) for r in rows]
            print(f"| {t} | " + " | ".join(f"{v / MIB:.0f}" for v in vals) + f" | {growth(vals):.2f}x |")
        spread = [r["s_per_m"] / med for r in rows]
        targets.append((f"build s/M within +-25% of the median across sizes (from {min(spread):.2f}x to "
                        f"{max(spread):.2f}x)", all(0.75 <= s <= 1.25 for s in spread), "build"))
    if emb:
        print("\n### Embed (STAND-IN encoder: 1-layer BERT, width 32; the real tokenizer and chunker; model "
              "throughput is bench/embed.py's job)\n")
        print("| chunks | docs | parts | actors | parts per actor | wall (s) | stage (s) | chunks/s (stage) | "
              "CPU machine | CPU job | driver (MiB) | largest actor (MiB) | Ray's own (MiB) |")
        print("|" + "---|" * 13)
        for e in emb:
            print(f"| {e['chunks']:,} | {e['docs']:,} | {e['parts']} | {e['actors']} | "
                  f"{'/'.join(map(str, e['parts_per_actor']))} | {e['wall_s']:.0f} | {e['stage_s']:.0f} | "
                  f"{e['chunks_per_s_stage']:,.0f} | {100 * e['cpu_machine']:.0f}% | {100 * e['cpu_job']:.0f}% | "
                  f"{e['driver'] / MIB:.0f} | {e['actor'] / MIB:.0f} | {e['ray_own'] / MIB:.0f} |")
        e = emb[-1]
        # judged on the job's own processes (Ray's included): on a machine shared with other jobs the
        # machine-wide figure counts their work too; on a machine of its own the two are the same
        targets.append((f"embed stage keeps {100 * e['cpu_job']:.0f}% of the cores busy with its own processes "
                        f"(machine-wide {100 * e['cpu_machine']:.0f}%) (>= 85%)", e["cpu_job"] >= 0.85, "embed"))
        if len(emb) > 1:
            for key, name in (("driver", "embed driver"), ("actor", "embed actor")):
                g = growth([x[key] for x in emb])
                targets.append((f"peak anonymous memory of the {name} grows {g:.2f}x (<= 1.25x)", g <= 1.25, name))
    print("\n### Targets\n")
    for line, ok, _ in targets:
        print(f"- {'PASS' if ok else 'FAIL'}: {line}")
    res["targets"] = [{"target": line, "pass": ok} for line, ok, _ in targets]
    if rows:
        res["projection"] = project(rows[-1], res, node_memory)
        plot(res)


def project(r: dict, res: dict, node_memory: int) -> list[dict]:
    """100M and 1B chunks from the largest size's per-shard figures, at the same shard size: serving memory
    (anonymous: must fit; and the mmapped files, which want page cache to be fast), disk, nodes, build CPU time."""
    per_shard_anon = max(r["replica"] - r["replica_base"], 0) / r["replica_shards"]
    disk_per_chunk = r["disk"]["total"] / r["n"]
    out = []
    print(f"\n### Projection (from {r['n']:,} chunks: {human_bytes(per_shard_anon)} anonymous per shard of "
          f"{res['shard_size']:,} in a replica (+ {human_bytes(r['replica_base'])} per replica process), "
          f"{disk_per_chunk:.0f} B of disk per chunk, {r['s_per_m']:.1f} s/M on {res['cores']} cores; node budget "
          f"{human_bytes(node_memory)})\n")
    print("| chunks | shards | replicas | serving anon | disk | nodes (anon) | nodes (anon + files in page cache) | "
          "build core-hours | largest task | IVF lists at this N (nlist_for) |")
    print("|" + "---|" * 10)
    for n in (100_000_000, 1_000_000_000):
        shards = math.ceil(n / res["shard_size"])
        replicas = math.ceil(shards / r["replica_shards"])
        anon = shards * per_shard_anon + replicas * r["replica_base"]
        disk = n * disk_per_chunk
        p = {"n": n, "shards": shards, "replicas": replicas, "anon": anon, "disk": disk,
             "nodes_anon": math.ceil(anon / node_memory), "nodes_cached": math.ceil((anon + disk) / node_memory),
             "core_hours": r["s_per_m"] * n / 1e6 * res["cores"] / 3600, "task": r["task"], "nlist": nlist_for(n)}
        out.append(p)
        print(f"| {n:,} | {shards:,} | {replicas:,} | {human_bytes(anon)} | {human_bytes(disk)} | {p['nodes_anon']} | "
              f"{p['nodes_cached']} | {p['core_hours']:,.0f} | {human_bytes(r['task'])} | {p['nlist']:,} |")
    print("\n(The projection keeps the measured factory and shard size; a larger nlist adds nlist x d x 4 bytes of "
          "coarse quantizer per shard. Build core-hours assume the measured s/M holds, which the s/M target tests.)")
    return out


def plot(res: dict) -> None:
    from jobs.plots import png, pyplot

    rows, emb = res["index"], res["embed"]
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["n"] for r in rows]
    for key, label in (("driver", "index driver"), ("task", "largest index task"), ("ray_own", "Ray's own (largest)"),
                       ("replica", f"replica ({res['args']['replica_shards']} shard(s))"),
                       ("searcher", "searcher, all shards (one process)")):
        a.plot(ns, [r[key] / MIB for r in rows], "o-", label=label)
    if len(emb) > 1:
        a.plot([e["chunks"] for e in emb], [e["actor"] / MIB for e in emb], "s--", label="embed actor")
    a.set_xscale("log")
    a.set_xlabel("chunks")
    a.set_ylabel("peak RssAnon (MiB)")
    a.set_title("peak anonymous memory", fontsize=9)
    a.legend(fontsize=7)
    b.plot(ns, [r["s_per_m"] for r in rows], "o-")
    med = statistics.median(r["s_per_m"] for r in rows)
    b.axhspan(0.75 * med, 1.25 * med, color="tab:green", alpha=0.15, label="median +-25%")
    b.set_xscale("log")
    b.set_xlabel("chunks")
    b.set_ylabel("build seconds per million chunks")
    b.set_title(f"{res['factory']}, shards of {res['shard_size']:,}", fontsize=9)
    b.legend(fontsize=7)
    fig.suptitle(f"bench/scale.py, {res['cores']} cores (load average {res['load_start']:.1f} at start)", fontsize=9)
    fig.tight_layout()
    path = Path(res["args"]["work"]).resolve() / "scale.png"
    path.write_bytes(png(fig, dpi=120))
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
