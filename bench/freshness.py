"""Time-to-index: an update of 1% of the corpus (`ragtune index add`) against a full rebuild (embed + index).

    python bench/freshness.py --corpus ../shared/data/squad/retrieval-v1.1/corpus.jsonl --repeats 3

The corpus (SQuAD v1.1 paragraphs, BEIR JSONL) is split, seeded: ``--new`` paragraphs are held out, the rest is
the base corpus, embedded and indexed once (Flat, 2 shards, as configs/index/squad.yaml chooses). The update is
1% of the corpus: the held-out paragraphs (new documents) and ``--edited`` base paragraphs with a sentence added
(changed documents). Both sides run as fresh CLI processes and are timed by wall clock, start to exit:

- update: ``ragtune index add -i INDEX --corpus update.jsonl`` on a fresh copy of the base index each repeat;
- the same update given as the whole updated corpus (unchanged documents are read, chunked, compared, skipped);
- full rebuild: ``ragtune embed`` of the whole updated corpus into a new folder, then ``ragtune index`` of it.

Medians of ``--repeats``, wall clock and CPU seconds of each process tree (sampled with psutil); the load
average of the machine before and after. Then, labelled apart: what a long-running process sees (the compare
job, a serving-side indexer): ``jobs.freshness.add`` called in one process where the model is already loaded
(and has embedded once), timed around the call on a fresh copy of the base index each repeat.
Then checks that a search of the update (dense and lexical) finds each edited paragraph's new sentence and a
new paragraph, and never the old text. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.embedders import QueryEncoder  # noqa: E402
from sharding.search import ShardedIndex  # noqa: E402

EDIT = " In 2031 the archive noted that {title} was revisited by the Zorvex commission."


CPU: list[float] = []  # CPU seconds of each command's process tree, in order


def ragtune(*args: str, log: Path) -> float:
    """Run ``ragtune ARGS`` as a fresh process; its wall-clock seconds (its output goes to ``log``). Its CPU
    seconds go to ``CPU``: user + system of the process and every descendant (Ray's GCS, raylet, workers),
    sampled every 0.25 s with psutil (a process's last quarter second, and processes shorter than that, are
    missed: a slight undercount on both sides)."""
    import psutil

    t0 = time.perf_counter()
    seen: dict[int, float] = {}
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for p in tree:
                try:
                    t = p.cpu_times()
                    seen[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
            time.sleep(0.25)
        rc = proc.returncode
    seconds = time.perf_counter() - t0
    CPU.append(sum(seen.values()))
    if rc:
        raise SystemExit(f"ragtune {' '.join(args)} failed (rc {rc}); see {log}")
    return seconds


WARM = """
import json, shutil, sys, time
from jobs import freshness
from models.embedders import QueryEncoder
from sharding.search import ShardedIndex
base, update, work, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
QueryEncoder(ShardedIndex.open(base).manifest, batch_size=64).encode(["warm up: the model has embedded once"])
out = []
for r in range(repeats):
    target = f"{work}/warm-{r}/index"
    shutil.copytree(base, target)
    t, c = time.perf_counter(), time.process_time()
    s = freshness.add(target, corpus=update)
    out.append({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "embed": s.embed_seconds})
print("WARM " + json.dumps(out))
"""


def warm_adds(base: Path, update: Path, work: Path, repeats: int) -> list[dict]:
    """``jobs.freshness.add`` in one process that loaded the model before (not timed): wall and CPU seconds of
    each call."""
    out = subprocess.run([sys.executable, "-c", WARM, str(base), str(update), str(work), str(repeats)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = [x for x in out.stdout.splitlines() if x.startswith("WARM ")]
    if out.returncode or not line:
        raise SystemExit(f"the warm-process adds failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(line[0][5:])


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def last_summary(log: Path) -> dict:
    """The JSON summary the last command printed (its last line of JSON)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def configs(work: Path, corpus: Path, name: str) -> tuple[Path, Path]:
    emb, idx = work / f"{name}.embed.yaml", work / f"{name}.index.yaml"
    emb.write_text(f"corpus:\n  path: {corpus}\n  id_field: _id\nchunk:\n  size: null\n  overlap: 32\n"
                   f"output:\n  path: {work / name / 'embeddings'}\n  num_parts: 4\n")
    idx.write_text(f"embeddings:\n  path: {work / name / 'embeddings'}\nindex:\n  path: {work / name / 'index'}\n"
                   "  kind: Flat\n  shards: 2\n")
    return emb, idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="BEIR corpus.jsonl (_id, title, text)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=10, help="paragraphs held out of the base, added by the update")
    ap.add_argument("--edited", type=int, default=11, help="base paragraphs changed by the update")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()

    import numpy as np

    work = Path(args.work or tempfile.mkdtemp(prefix="ragtune-freshness-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    docs = [json.loads(line) for line in Path(args.corpus).read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(docs))
    new_ids = {docs[i]["_id"] for i in pick[:args.new]}
    edit_ids = {docs[i]["_id"] for i in pick[args.new:args.new + args.edited]}
    base = [d for d in docs if d["_id"] not in new_ids]
    edited = {d["_id"]: {**d, "text": d["text"] + EDIT.format(title=d["title"])} for d in docs if d["_id"] in edit_ids}
    update = [edited[d["_id"]] for d in base if d["_id"] in edited] + [d for d in docs if d["_id"] in new_ids]
    updated = [edited.get(d["_id"], d) for d in docs]
    write_jsonl(work / "base.jsonl", base)
    write_jsonl(work / "update.jsonl", update)
    write_jsonl(work / "updated.jsonl", updated)
    share = len(update) / len(updated)
    print(f"corpus {len(docs):,} paragraphs; base {len(base):,}; update {len(update)} ({len(new_ids)} new, "
          f"{len(edit_ids)} edited) = {share:.1%} of the updated corpus; work folder {work}; {os.cpu_count()} CPUs, "
          f"load average (1/5/15 min) {load_average()}")

    emb_cfg, idx_cfg = configs(work, work / "base.jsonl", "base")
    t_base = ragtune("embed", "-c", str(emb_cfg), log=log) + ragtune("index", "-c", str(idx_cfg), log=log)
    print(f"base index built in {t_base:.1f}s (embed + index, not part of the comparison); load average "
          f"{load_average()}", flush=True)

    t_update, t_whole, t_rebuild, inside, embed = [], [], [], [], []
    c_update, c_whole, c_rebuild = [], [], []
    for r in range(args.repeats):
        target = work / f"update-{r}" / "index"
        shutil.copytree(work / "base" / "index", target)  # every repeat starts from the same base version
        t_update.append(ragtune("index", "add", "-i", str(target), "--corpus", str(work / "update.jsonl"), log=log))
        c_update.append(CPU[-1])
        summary = last_summary(log)
        inside.append(summary["seconds"])
        embed.append(summary["embed_seconds"])
        whole = work / f"whole-{r}" / "index"  # the same update, given as the whole updated corpus
        shutil.copytree(work / "base" / "index", whole)
        t_whole.append(ragtune("index", "add", "-i", str(whole), "--corpus", str(work / "updated.jsonl"), log=log))
        c_whole.append(CPU[-1])
        emb_cfg, idx_cfg = configs(work, work / "updated.jsonl", f"rebuild-{r}")
        t_embed = ragtune("embed", "-c", str(emb_cfg), log=log)
        t_index = ragtune("index", "-c", str(idx_cfg), log=log)
        t_rebuild.append(t_embed + t_index)
        c_rebuild.append(CPU[-2] + CPU[-1])
        print(f"repeat {r + 1}: update {t_update[-1]:.1f}s ({c_update[-1]:.1f} CPU-s); same update as the whole "
              f"corpus {t_whole[-1]:.1f}s; full rebuild {t_rebuild[-1]:.1f}s (embed {t_embed:.1f}s + index "
              f"{t_index:.1f}s; {c_rebuild[-1]:.1f} CPU-s); load average {load_average()}", flush=True)
        if r:
            shutil.rmtree(work / f"rebuild-{r}", ignore_errors=True)
    warm = warm_adds(work / "base" / "index", work / "update.jsonl", work, args.repeats)
    print(f"load average after the timed runs: {load_average()}")
    med = statistics.median
    u, w, f = med(t_update), med(t_whole), med(t_rebuild)
    print(f"\n| measure (fresh CLI processes, median of {args.repeats}) | wall s | ratio | CPU s | ratio |")
    print("|---|---|---|---|---|")
    print(f"| full rebuild: `ragtune embed` + `ragtune index` of the updated corpus | {f:.1f} | 1.0x | "
          f"{med(c_rebuild):.1f} | 1.0x |")
    print(f"| update: `ragtune index add --corpus update.jsonl` ({len(update)} docs, {share:.1%}) | {u:.1f} | "
          f"**{f / u:.1f}x** faster | {med(c_update):.1f} | {med(c_rebuild) / med(c_update):.1f}x |")
    print(f"| ... of which inside `jobs.freshness.add` (after the CLI's imports) | {med(inside):.1f} | | | |")
    print(f"| ... of which embedding (torch + model load + encode) | {med(embed):.1f} | | | |")
    print(f"| the same update given as the whole updated corpus ({len(updated):,} docs, {len(docs) - len(update)} "
          f"unchanged skipped) | {w:.1f} | {f / w:.1f}x | {med(c_whole):.1f} | {med(c_rebuild) / med(c_whole):.1f}x |")
    print(f"(best of {args.repeats}: update {min(t_update):.1f}s, full rebuild {min(t_rebuild):.1f}s, "
          f"{min(t_rebuild) / min(t_update):.1f}x)")
    ww, wc = med([x["wall"] for x in warm]), med([x["cpu"] for x in warm])
    walls = [f"{x['wall']:.2f}" for x in warm]
    print(f"\nlong-running process (model already loaded), `jobs.freshness.add` of the same update, median of "
          f"{len(warm)}: {ww:.2f}s wall ({f / ww:.0f}x faster than the full rebuild), {wc:.2f} CPU-s, of which "
          f"embedding {med([x['embed'] for x in warm]):.2f}s; repeats {', '.join(f'{x}' for x in walls)}s")

    # Does a search of the updated index see the update, and never the old text?
    index = ShardedIndex.open(str(work / "update-0" / "index"))
    rebuilt = ShardedIndex.open(str(work / "rebuild-0" / "index"))
    enc = QueryEncoder(index.manifest)
    old_text = {d["_id"]: d["text"] for d in docs}
    queries = [EDIT.format(title=edited[i]["title"]).strip() for i in sorted(edit_ids)]
    want = sorted(edit_ids)
    found = {"dense": 0, "lexical": 0, "rebuild dense": 0}
    stale = 0
    for mode, ix in (("dense", index), ("lexical", index), ("rebuild dense", rebuilt)):
        if mode == "lexical":
            _, I = ix.search_lexical(queries, 5)
        else:
            _, I = ix.search(enc.encode(queries), 5)
        rows = ix.docstore().lookup(I[I >= 0])
        for q, doc in enumerate(want):
            hits = [rows[c] for c in I[q] if c >= 0]
            found[mode] += any(h["doc_id"] == doc and "Zorvex" in h["text"] for h in hits)
            stale += any(h["doc_id"] == doc and h["text"] == old_text[doc] for h in hits)
    new_q = [d["text"][:200] for d in docs if d["_id"] in new_ids]
    _, I = index.search(enc.encode(new_q), 1)
    new_found = sum(index.docstore().lookup(I[:, 0])[c]["doc_id"] in new_ids for c in I[:, 0])
    print(f"\nafter the update: the edited sentence of {len(want)} edited paragraphs is the top-5 of its query for "
          f"{found['dense']} (dense), {found['lexical']} (BM25) [full rebuild, dense: {found['rebuild dense']}]; "
          f"old text returned {stale} times; {new_found}/{len(new_q)} new paragraphs found at rank 1 by their text")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
