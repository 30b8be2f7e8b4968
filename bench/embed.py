"""Benchmark: `ragtune embed` (Ray Data) against a plain single-process SentenceTransformer.encode loop.

Both embed the same chunks on the same machine in one run; each side runs in its own process (so its memory is
its own), alternating, ``--repeats`` times, and the medians are compared:

    python bench/embed.py                                  # SQuAD v1.1 paragraphs from ../shared/data
    python bench/embed.py --corpus my.jsonl --id-field id --repeats 5
    python bench/embed.py --layouts auto,1x2            # also 1 actor x 2 threads
    python bench/embed.py --size 32 --overlap 16        # ~20k short chunks from one file

Printed: chunks/s of the baseline encode loop (model loaded beforehand, not timed); chunks/s of ragtune's
embedding stage (the busiest actor's own time over its parts: read, chunk, encode, write); chunks/s of the whole
ragtune job (wall clock, including starting Ray and the actors); the ratios of the
two to the baseline; and the peak resident memory of each process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "squad" / "retrieval-v1.1" / "corpus.jsonl"

BASELINE = r"""
import json, sys, time, torch
import pyarrow.json as pajson
from models.embedders import load_tokenizer, resolve_embedder
from sharding.chunking import Chunker, embed_input
from sharding.corpus import to_documents
torch.set_num_threads(int(sys.argv[3]))
from sentence_transformers import SentenceTransformer
spec = resolve_embedder("all-MiniLM-L6-v2")
size = int(sys.argv[4])
docs = to_documents(pajson.read_json(sys.argv[1]), "text", sys.argv[2], "title").to_pylist()
chunker = Chunker(load_tokenizer(spec.path), size, int(sys.argv[6]))
texts = [embed_input(d["title"], c.text) for d in docs for c in chunker.chunk(d["text"], d["title"])]
model = SentenceTransformer(spec.path, device="cpu")
model.encode(texts[:64], batch_size=64)  # warm up
t0 = time.perf_counter()
xb = model.encode(texts, batch_size=int(sys.argv[5]), normalize_embeddings=True, convert_to_numpy=True)
dt = time.perf_counter() - t0
print("RESULT " + json.dumps({"chunks": len(texts), "seconds": dt}))
"""


def peak_rss_of(proc: subprocess.Popen, out: dict) -> None:
    """Sample the summed RSS of a process and all its descendants until it exits."""
    import psutil

    peak = 0
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
            time.sleep(0.2)
    except psutil.Error:
        pass
    out["peak_rss"] = peak


def run_measured(cmd: list[str], env: dict) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    mem: dict = {}
    th = threading.Thread(target=peak_rss_of, args=(proc, mem))
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
    return stdout, wall, mem.get("peak_rss", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--id-field", default="_id")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=254, help="chunk size in tokens")
    ap.add_argument("--overlap", type=int, default=32, help="chunk overlap in tokens")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layouts", default="auto",
                    help="comma-separated ragtune actor layouts: auto (the job's own plan) or AxT = A actors x T "
                         "threads (parts as the job plans them)")
    args = ap.parse_args()
    layouts = args.layouts.split(",")
    if not Path(args.corpus).is_file():
        sys.exit(f"corpus not found: {args.corpus} (pass --corpus, or put the shared data beside the repo)")
    threads = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}

    base, base_mem = [], []
    stage: dict[str, list[float]] = {lay: [] for lay in layouts}
    whole: dict[str, list[float]] = {lay: [] for lay in layouts}
    mem: dict[str, list[int]] = {lay: [] for lay in layouts}
    chunks = 0
    for r in range(args.repeats):
        out, _, rss = run_measured([sys.executable, "-c", BASELINE, args.corpus, args.id_field, str(threads),
                                    str(args.size), str(args.batch_size), str(args.overlap)], env)
        res = json.loads(out.split("RESULT ", 1)[1])
        chunks = res["chunks"]
        base.append(res["chunks"] / res["seconds"])
        base_mem.append(rss)
        line = f"run {r + 1}/{args.repeats}: baseline {base[-1]:.1f} chunks/s"
        for lay in layouts:
            extra = []
            if lay != "auto":
                a, t = (int(x) for x in lay.split("x"))
                extra = [f"embed.actors={a}", f"embed.threads_per_actor={t}"]
            with tempfile.TemporaryDirectory() as tmp:
                out, wall, rss = run_measured(
                    [sys.executable, "-m", "jobs.embed", "--config", "configs/embed/squad-beir.yaml",
                     f"corpus.path={args.corpus}", f"corpus.id_field={args.id_field}", f"output.path={tmp}/emb",
                     f"chunk.size={args.size}", f"chunk.overlap={args.overlap}", f"embed.batch_size={args.batch_size}",
                     *extra], env)
                summary = json.loads(out.strip().splitlines()[-1])
                manifest = json.loads((Path(tmp) / "emb" / "_manifest.json").read_text())
            assert summary["chunks"] == chunks, (summary["chunks"], chunks)
            # actors work in parallel: the stage lasts as long as the busiest actor's parts (read, chunk, embed,
            # write), each part recording the actor that made it
            per_actor: dict[str, float] = {}
            for p in manifest["parts"].values():
                per_actor[p["worker"]] = per_actor.get(p["worker"], 0.0) + float(p["seconds"])
            busy = max(per_actor.values())
            stage[lay].append(chunks / busy)
            whole[lay].append(chunks / wall)
            mem[lay].append(rss)
            line += f"; ragtune {lay}: stage {stage[lay][-1]:.1f}, whole job {whole[lay][-1]:.1f} ({wall:.0f}s)"
        print(line, flush=True)

    mb = statistics.median(base)
    gib = 2**30
    print()
    print(f"corpus: {args.corpus} -> {chunks} chunks of <= {args.size} tokens (overlap {args.overlap}); "
          f"{threads} cores; "
          f"batch {args.batch_size}; medians of {args.repeats}")
    print("| measure | chunks/s | ratio to baseline | peak RSS of the process tree (GiB) |")
    print("|---|---|---|---|")
    print(f"| SentenceTransformer.encode, 1 process, {threads} threads | {mb:.1f} | 1.00x | "
          f"{statistics.median(base_mem) / gib:.2f} |")
    for lay in layouts:
        ms, mj = statistics.median(stage[lay]), statistics.median(whole[lay])
        print(f"| ragtune embed ({lay}), embedding stage | {ms:.1f} | {ms / mb:.2f}x | |")
        print(f"| ragtune embed ({lay}), whole job incl. Ray start | {mj:.1f} | {mj / mb:.2f}x | "
              f"{statistics.median(mem[lay]) / gib:.2f} |")


if __name__ == "__main__":
    main()
