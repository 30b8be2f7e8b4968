"""Freshness on real data: `ragtune index add|delete|compact` on the SQuAD v1.1 index with the real model.

The unit tests (tests/sharding/test_freshness.py) cover every operation on synthetic indexes; here the corpus
path (reading, chunking with the index's chunker, embedding with its model in this process or on Ray Data) and
the CLI run end to end, and a search of the update finds the new text and never the old.
"""

import json

import numpy as np
import pytest

from configs.errors import RagtuneError
from configs.schema import IndexJobConfig
from jobs.cli import main
from jobs.freshness import add
from jobs.index import run
from models.embedders import QueryEncoder, load_sentence_transformer, resolve_embedder
from sharding.search import ShardedIndex, search

EDIT = " In 2031 the Zorvex commission renamed the trophy after Ilse Varnhagen."


@pytest.fixture(scope="module")
def squad_index(squad_embeddings, squad_retrieval, tmp_path_factory):
    """The SQuAD chunks in an exact index of 2 shards (v-00001), the corpus documents, and the index's encoder."""
    _, _, emb = squad_embeddings
    root = tmp_path_factory.mktemp("fresh") / "index"
    run(IndexJobConfig.model_validate({"embeddings": {"path": str(emb)},
                                       "index": {"path": str(root), "kind": "Flat", "shards": 2}}))
    docs = [json.loads(line) for line in (squad_retrieval / "corpus.jsonl").read_text().splitlines()]
    encoder = QueryEncoder(ShardedIndex.open(str(root)).manifest)
    return root, docs, encoder


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_add_update_delete_compact_on_squad_through_the_cli(squad_index, tmp_path, capsys):
    root, docs, encoder = squad_index
    edited = [{**d, "text": d["text"] + EDIT} for d in docs[:3]]  # sq00p000 (Super Bowl 50) and two more
    new = [{"_id": f"new{i}", "title": "Flumoxed gardening",
            "text": f"Flumoxed gardening variant {w} grows tomatoes under violet lamps on the moon of Kepler-{i}."}
           for i, w in enumerate(["alpha", "bravo", "charlie", "delta"])]
    corpus = write_jsonl(tmp_path / "update.jsonl", edited + new + docs[10:15])  # + 5 unchanged
    assert main(["index", "add", "-i", str(root), "--corpus", corpus]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["docs_added"], s["docs_updated"], s["docs_skipped"], s["embedded_by"]) == (4, 3, 5, "this process")
    index = ShardedIndex.open(str(root))
    assert index.ntotal == 2257 + s["chunks_added"] - s["chunks_masked"]
    # one delta segment for the whole add (on the smaller shard), not one per shard
    assert s["segments"] == 1 and sum(len(r.deltas) for r in index.manifest.shards) == 1
    store = index.docstore()
    queries = ["Which commission renamed the trophy after Ilse Varnhagen?", "flumoxed gardening variant charlie"]
    for mode in ("dense", "lexical", "hybrid"):
        _, I = search(index, encoder.encode(queries), queries, 5, mode)
        rows = store.lookup(I[I >= 0])
        top = [[rows[c] for c in q if c >= 0] for q in I]
        assert any(r["doc_id"] == "sq00p000" and "Zorvex" in r["text"] for r in top[0]), mode
        assert any(r["doc_id"] == "new2" for r in top[1][:2]), mode
    # the old text of an edited paragraph is gone from every mode
    old = docs[0]["text"]
    _, I = search(index, encoder.encode([old]), [old], 50, "hybrid")
    hits = store.lookup(I[I >= 0])
    assert all(h["text"] != old for h in hits.values())
    assert any(h["doc_id"] == "sq00p000" for h in hits.values())  # its new version is found instead
    assert main(["index", "delete", "-i", str(root), "--doc-id", "new2", "sq00p001"]) == 0
    capsys.readouterr()
    index = ShardedIndex.open(str(root))
    _, I = index.search_lexical(["flumoxed gardening variant charlie"], 20)
    docs_found = {r["doc_id"] for r in index.docstore().lookup(I[I >= 0]).values()}
    assert "new2" not in docs_found and "new1" in docs_found
    assert main(["index", "compact", "-i", str(root), "--force"]) == 0
    out = capsys.readouterr().out
    assert "compacted 2 shard(s)" in out
    compacted = ShardedIndex.open(str(root))
    assert compacted.ntotal == index.ntotal and all(not r.deltas for r in compacted.manifest.shards)
    D1, I1 = index.search(encoder.encode(queries), 10)
    D2, I2 = compacted.search(encoder.encode(queries), 10)
    assert (I1 == I2).all() and np.allclose(D1, D2, atol=1e-5)  # exact: compaction changes no result
    assert main(["index", "history", "-i", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| add | v-00001 |" in out and "| delete | v-00002 |" in out and "| compact | v-00003 |" in out
    # --segment-size bounds the delta segments' size: 3 one-chunk documents in segments of 2 -> 2 segments
    more = write_jsonl(tmp_path / "more.jsonl", [{"_id": f"seg{i}", "title": "Segments", "text": f"Segment {w}."}
                                                 for i, w in enumerate(["one", "two", "three"])])
    assert main(["index", "add", "-i", str(root), "--corpus", more, "--segment-size", "2"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["chunks_added"], s["segments"]) == (3, 2)
    assert sum(len(r.deltas) for r in ShardedIndex.open(str(root)).manifest.shards) == 2


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_plain_transformers_encoder_gives_the_sentence_transformers_vectors(squad_index):
    root, docs, encoder = squad_index
    m = ShardedIndex.open(str(root)).manifest
    texts = [f"{d['title']}\n{d['text']}" for d in docs[:16]] + ["x", "word " * 400]  # one cut at 256 tokens
    st = load_sentence_transformer(resolve_embedder(m.model.name))  # the embed job's actors' model
    want = st.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=m.normalize)
    np.testing.assert_allclose(QueryEncoder(m, batch_size=64).encode(texts), want, atol=1e-5)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_large_adds_go_through_the_embed_job_and_other_chunkers_are_refused(squad_index, squad_embeddings, tmp_path):
    root, docs, encoder = squad_index
    _, _, emb = squad_embeddings
    new = [{"_id": "ray0", "title": "Ray path", "text": "A paragraph embedded by the Ray Data embed job for an add."}]
    corpus = write_jsonl(tmp_path / "ray.jsonl", new)
    s = add(str(root), corpus=corpus, ray_above=0)  # every add above 0 chunks takes the Ray Data path
    assert s.embedded_by.startswith("ray data") and s.docs_added == 1
    index = ShardedIndex.open(str(root))
    _, I = index.search(encoder.encode(["A paragraph embedded by the Ray Data embed job"]), 1)
    assert index.docstore().lookup(I[0])[I[0, 0]]["doc_id"] == "ray0"
    assert not (root / "_staging").exists() or not any((root / "_staging").iterdir())
    # embeddings made with another chunker are refused, naming what differs
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((emb / "_manifest.json").read_text())
    m["chunker"] = {**m["chunker"], "size": 128, "fingerprint": "0000"}
    (other / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(RagtuneError, match=r"were made differently from the index: chunker size 128 vs the index's"):
        add(str(root), embeddings=str(other))
