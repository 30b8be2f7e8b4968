"""The embed job on a real local Ray, on real data (SQuAD v1.1 paragraphs from ../shared)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from configs.errors import RagtuneError
from configs.schema import EmbedJobConfig
from jobs.embed import check, run
from sharding.chunking import Chunker, ChunkerSettings, embed_input
from sharding.corpus import to_documents
from sharding.embeddings import chunk_documents, read_manifest, vectors_from_arrow, verify_part
from sharding.storage import resolve
from tests.conftest import REPO


def config(corpus, out, **sections) -> EmbedJobConfig:
    data = {"corpus": {"path": str(corpus), "id_field": "_id"}, "output": {"path": str(out)}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return EmbedJobConfig.model_validate(data)


def read_parts(out):
    tables = [pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))]
    return pa.concat_tables(tables)


def expected_chunk_ids(corpus_file, cfg: EmbedJobConfig, spec, tok) -> set[int]:
    """What the job must write, computed here without Ray: every (doc, chunk) exactly once."""
    size = cfg.chunk.size or spec.max_seq_length - 2
    settings = ChunkerSettings(size, cfg.chunk.overlap, cfg.chunk.prepend_title, spec.revision)
    docs = to_documents(pajson.read_json(corpus_file), "text", cfg.corpus.id_field, "title")
    t = chunk_documents(docs, Chunker(tok, size, cfg.chunk.overlap), settings.fingerprint())
    return {c for c, i in zip(t["chunk_id"].to_pylist(), t["chunk_index"].to_pylist(), strict=True) if i >= 0}


def head(src, dst, n):
    with open(src) as f, open(dst, "w") as g:
        for _, line in zip(range(n), f, strict=False):
            g.write(line)
    return dst


# --- checks before any work (no Ray) ----------------------------------------------------------------------

def test_bad_inputs_fail_before_any_work(tmp_path, minilm):
    good = tmp_path / "c.jsonl"
    good.write_text('{"_id": "a", "text": "hello world"}\n')
    cases = {
        "does not exist": config(tmp_path / "missing.jsonl", tmp_path / "o1"),
        "the corpus is empty": config(_touch(tmp_path / "empty.jsonl"), tmp_path / "o2"),
        "no `text` field": config(_write(tmp_path / "nt.jsonl", '{"body": "x"}\n'), tmp_path / "o3"),
        "not UTF-8": config(_write(tmp_path / "bin.txt", b"\xff\xfe\x00bad"), tmp_path / "o4"),
        "chunk.size = 300 is larger than all-MiniLM-L6-v2 takes: 256 tokens including 2 special ones. "
        "Fix: set chunk.size <= 254": config(good, tmp_path / "o5", chunk={"size": 300}),
    }
    for expected, cfg in cases.items():
        with pytest.raises(RagtuneError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check(cfg)


def test_output_holding_other_embeddings_is_refused(tmp_path, minilm):
    corpus = _write(tmp_path / "c.jsonl", '{"_id": "a", "text": "hello world"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(RagtuneError, match=r"holds 1 part files but no _manifest.json"):
        check(config(corpus, out))
    check(config(corpus, out, output={"overwrite": True}))  # --overwrite accepts it


def test_output_holding_another_models_embeddings_is_refused(tmp_path, minilm):
    from sharding.embeddings import EmbeddingManifest, write_manifest

    corpus = _write(tmp_path / "c.jsonl", '{"_id": "a", "text": "hello world"}\n')
    cfg = config(corpus, tmp_path / "out")
    plan = check(cfg)
    other = EmbeddingManifest(model={"name": "intfloat/e5-small-v2", "revision": "abc123"}, normalize=True,
                              metric="inner_product", chunker=plan.settings.to_dict(), num_parts=1,
                              corpus={"fingerprint": plan.corpus.fingerprint(), "files": 1, "bytes": 1})
    (tmp_path / "out").mkdir()
    write_manifest(plan.out, other)
    with pytest.raises(RagtuneError, match=r"holds embeddings made differently: model intfloat/e5-small-v2 "
                                           r"\(abc123\) vs all-MiniLM-L6-v2 .*--overwrite"):
        check(cfg)


def test_unfinished_embeddings_of_the_first_format_are_refused_and_finished_ones_kept(tmp_path, minilm):
    """Parts chosen by a hash of the text (no `inputs` in the manifest) cannot be resumed by input: a running or
    damaged folder is refused with the fix; a complete one is still what it was (nothing to do)."""
    from sharding.embeddings import EmbeddingManifest, PartRecord, write_manifest

    corpus = _write(tmp_path / "c.jsonl", '{"_id": "a", "text": "hello world"}\n')
    cfg = config(corpus, tmp_path / "out")
    plan = check(cfg)
    (tmp_path / "out").mkdir()
    part = PartRecord(file="part-00000.parquet", rows=1, embedded=1, sha256="x", bytes=1)
    old = EmbeddingManifest(model=plan.spec.to_dict(), normalize=True, metric="inner_product",
                            chunker=plan.settings.to_dict(), num_parts=1, parts={"00000": part}, state="done",
                            corpus={"fingerprint": plan.corpus.fingerprint(), "files": 1, "bytes": 1})
    write_manifest(plan.out, old)
    with pytest.raises(RagtuneError, match=r"earlier ragtune \(done, .*not complete.*--overwrite"):
        check(cfg)  # its part file is gone
    _touch(tmp_path / "out" / "part-00000.parquet")
    assert check(cfg).previous.state == "done"
    write_manifest(plan.out, old.model_copy(update={"state": "running"}))
    with pytest.raises(RagtuneError, match=r"earlier ragtune \(running, .*--overwrite"):
        check(cfg)


def _touch(p):
    p.write_text("")
    return p


def _write(p, data):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
    return p


# --- real runs --------------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow
def test_squad_corpus_end_to_end(squad_embeddings, squad_retrieval, minilm):
    cfg, summary, out = squad_embeddings
    spec, tok = minilm
    assert summary.docs == 2067 and summary.empty_docs == 0
    t = read_parts(out)
    ids = t["chunk_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.chunks >= 2067
    assert set(ids) == expected_chunk_ids(squad_retrieval / "corpus.jsonl", cfg, spec, tok)
    assert set(t["doc_id"].to_pylist()) == {json.loads(line)["_id"] for line in open(squad_retrieval /
                                                                                     "corpus.jsonl")}
    assert t.schema.field("vector").type == pa.list_(pa.float32(), 384)
    m = read_manifest(resolve(str(out)))
    assert m.state == "done" and m.dim == 384 and m.normalize and m.num_parts == 4
    assert len(summary.parts_per_actor) == 2  # one input file, 4 byte ranges: both actors embedded parts
    assert sum(r.rows for r in m.parts.values()) == len(ids)
    for rec in m.parts.values():
        verify_part(resolve(str(out)), rec)
    assert m.model.revision == spec.revision and m.chunker.size == 254
    xb = vectors_from_arrow(t["vector"])
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_vectors_equal_sentence_transformers(squad_embeddings, minilm):
    from sentence_transformers import SentenceTransformer

    _, _, out = squad_embeddings
    t = read_parts(out)
    rows = np.random.default_rng(0).choice(t.num_rows, size=96, replace=False)
    sample = t.take(pa.array(rows))
    texts = [embed_input(ti, te) for ti, te in zip(sample["title"].to_pylist(), sample["text"].to_pylist(),
                                                   strict=True)]
    ref = SentenceTransformer(minilm[0].path, device="cpu").encode(texts, normalize_embeddings=True)
    ours = vectors_from_arrow(sample["vector"])
    cos = np.sum(ref * ours, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.999, cos.min()


@pytest.mark.integration
def test_duplicates_are_embedded_once_and_empty_docs_counted(ray_2_cpus, tmp_path):
    records = [
        {"_id": "a", "title": "Shared", "text": "The same boilerplate paragraph."},
        {"_id": "b", "title": "Shared", "text": "The same boilerplate paragraph."},
        {"_id": "c", "title": "Other", "text": "A different paragraph about the Ophir river."},
        {"_id": "c", "title": "Other", "text": "A different paragraph about the Ophir river."},  # listed twice
        {"_id": "e", "title": "Empty", "text": ""},
        {"title": "No id", "text": "This document has no id; it gets one from its content."},
    ]
    src = tmp_path / "corpus"
    _write(src / "a.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    # b.jsonl is padded (in metadata) to be cut in two byte ranges, its records all in the first: a.jsonl is one part
    _write(src / "b.jsonl", json.dumps(records[2]) + "\n" + json.dumps({"_id": "f", "text": "Only in b.",
                                                                          "pad": "x" * 3000}) + "\n")
    summary = run(config(src, tmp_path / "out", output={"num_parts": 2}))
    assert summary.parts == 2  # a part per file (and an empty third, the second range of b.jsonl)
    assert (summary.docs, summary.empty_docs, summary.chunks) == (8, 1, 5)
    # "c" three times: twice in a.jsonl (dropped in its part), once more in b.jsonl (dropped after embedding)
    assert summary.duplicates_skipped == 1 and summary.repeated_rows == 2
    t = read_parts(tmp_path / "out")
    assert sorted(t["doc_id"].to_pylist())[:4] == ["a", "b", "c", "f"] and t.num_rows == 5
    by_doc = {d: v for d, v in zip(t["doc_id"].to_pylist(), vectors_from_arrow(t["vector"]), strict=True)}
    np.testing.assert_array_equal(by_doc["a"], by_doc["b"])
    m = read_manifest(resolve(str(tmp_path / "out")))
    assert sum(r.rows for r in m.parts.values()) == 5 and not (tmp_path / "out" / "_parts").exists()
    for rec in m.parts.values():
        verify_part(resolve(str(tmp_path / "out")), rec)


@pytest.mark.integration
def test_one_id_for_two_different_texts_is_refused_in_a_part_and_across_parts(ray_2_cpus, tmp_path):
    corpus = _write(tmp_path / "c.jsonl", '{"_id": "x", "text": "first text"}\n{"_id": "x", "text": "second"}\n'
                                          '{"_id": "y", "text": "fine"}\n')
    with pytest.raises(RagtuneError, match=r"documents \['x'\] appear more than once with different text") as e:
        run(config(corpus, tmp_path / "out"))
    assert e.value.param == "corpus.id_field"
    assert not list((tmp_path / "out").glob("part-*"))  # refused before its part is written
    src = tmp_path / "two"
    _write(src / "a.jsonl", '{"_id": "x", "text": "first text"}\n')
    _write(src / "b.jsonl", '{"_id": "x", "text": "second"}\n')
    with pytest.raises(RagtuneError, match=r"documents \['x'\] appear more than once with different text"):
        run(config(src, tmp_path / "out2", output={"num_parts": 2}))
    assert read_manifest(resolve(str(tmp_path / "out2"))).state == "running"


@pytest.mark.integration
def test_rerun_refuses_another_chunker_and_overwrite_replaces(ray_2_cpus, squad_retrieval, tmp_path):
    corpus = head(squad_retrieval / "corpus.jsonl", tmp_path / "c.jsonl", 40)
    out = tmp_path / "out"
    first = run(config(corpus, out, chunk={"size": 128}))
    again = run(config(corpus, out, chunk={"size": 128}))
    assert again.parts_written == 0 and again.chunks == first.chunks  # nothing to do
    with pytest.raises(RagtuneError, match=r"made differently: chunker size 128 vs 64.*--overwrite"):
        run(config(corpus, out, chunk={"size": 64}))
    replaced = run(config(corpus, out, chunk={"size": 64}, output={"overwrite": True}))
    assert replaced.chunks > first.chunks
    assert read_parts(out).num_rows == replaced.chunks


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_killed_run_resumes_without_reading_finished_input_and_writes_every_chunk_once(ray_2_cpus, squad_retrieval,
                                                                                        tmp_path, minilm):
    corpus = head(squad_retrieval / "corpus.jsonl", tmp_path / "c.jsonl", 400)
    pristine = corpus.read_bytes()
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.embed", "--config", str(REPO / "configs/embed/squad-beir.yaml"),
            f"corpus.path={corpus}", f"output.path={out}", "output.num_parts=6", "chunk.size=128"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # kill it as soon as a part is recorded, well before the last
            if list((out / "_parts").glob("part-*.json")):
                break
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = read_manifest(resolve(str(out)))
    finished = {int(p.stem[5:]) for p in (out / "_parts").glob("part-*.json")}
    assert killed.state == "running" and killed.num_parts == 6 and 1 <= len(finished) < 6

    # the lines of the finished parts (those that start in their byte ranges) are overwritten with bytes that are
    # not text, newlines kept, same size and modification time (the corpus looks unchanged): the resume succeeds
    # only if it never reads them
    stat = corpus.stat()
    data = bytearray(pristine)
    for p in finished:
        for s in killed.inputs[p].slices:
            begin = 0 if s.start == 0 else pristine.index(b"\n", s.start - 1) + 1
            end = pristine.index(b"\n", s.stop - 1) + 1 if s.stop < len(pristine) else len(pristine)
            for i in range(begin, end):
                if pristine[i] != ord("\n"):
                    data[i] = 0xFF
    corpus.write_bytes(bytes(data))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    cfg = config(corpus, out, chunk={"size": 128}, output={"num_parts": 6})
    summary = run(cfg)
    assert summary.parts_skipped == len(finished) and summary.parts_written == 6 - len(finished)
    t = read_parts(out)
    ids = t["chunk_id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary.chunks
    corpus.write_bytes(pristine)
    assert set(ids) == expected_chunk_ids(corpus, cfg, *minilm)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.integration
def test_jsonl_parquet_and_markdown_in_one_corpus(ray_2_cpus, tmp_path):
    src = tmp_path / "corpus"
    (src / "notes").mkdir(parents=True)
    record = {"_id": "j1", "title": "Jay", "text": "Jay lives in Ophir.", "year": 1990}
    _write(src / "a.jsonl", json.dumps(record) + "\n")
    pq.write_table(pa.table({"_id": [7], "text": ["Parquet row seven."], "lang": ["en"]}), src / "b.parquet")
    _write(src / "notes" / "c.md", "# Notes\n\nMarkdown body without a title field.\n")
    _write(src / "notes" / "d.txt", "plain text file")
    summary = run(config(src, tmp_path / "out"))
    assert (summary.docs, summary.chunks) == (4, 4)
    rows = {r["doc_id"]: r for r in read_parts(tmp_path / "out").to_pylist()}
    assert set(rows) == {"j1", "7", "notes/c.md", "notes/d.txt"}
    assert rows["j1"]["title"] == "Jay" and json.loads(rows["j1"]["metadata"]) == {"year": 1990}
    assert json.loads(rows["7"]["metadata"]) == {"lang": "en"} and rows["7"]["title"] is None
    assert rows["notes/c.md"]["title"] == "Notes" and json.loads(rows["notes/c.md"]["metadata"]) == {
        "path": "notes/c.md"}
