"""The index's model in this process (QueryEncoder): plain transformers where the sentence-transformers pipeline
is plain, and the same vectors as sentence-transformers (the embed job's model) to 1e-5."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from models.embedders import QueryEncoder, load_sentence_transformer, plain_pipeline, resolve_embedder
from sharding.manifest import IndexManifest


def manifest(spec, normalize=True):
    return IndexManifest(version="v-00001", factory="IDMap2,Flat", kind="flat", reason="", metric="inner_product",
                         dim=384, normalize=normalize, ntotal=1, shards=[], model=spec.to_dict())


@pytest.fixture(scope="module")
def st_minilm(minilm):
    spec, _ = minilm
    return load_sentence_transformer(spec)


def texts_of(squad_retrieval, n_queries=16, n_docs=6):
    """Real queries and passages (title + text, one cut at 256 tokens), and edge cases."""
    with open(squad_retrieval / "queries.jsonl") as f:
        queries = [json.loads(next(f))["text"] for _ in range(n_queries)]
    with open(squad_retrieval / "corpus.jsonl") as f:
        docs = [json.loads(next(f)) for _ in range(n_docs)]
    return queries + [f"{d['title']}\n{d['text']}" for d in docs] + ["x", "  padded query  ", "word " * 400]


@pytest.mark.parametrize("batch_size,normalize", [(512, True), (8, True), (64, False)])
def test_query_encoder_gives_the_sentence_transformers_vectors(minilm, st_minilm, squad_retrieval, batch_size,
                                                               normalize):
    spec, _ = minilm
    texts = texts_of(squad_retrieval)
    enc = QueryEncoder(manifest(spec, normalize), batch_size=batch_size)
    assert enc.pooling == "mean" and enc.dim == 384  # the plain path, not sentence-transformers
    want = st_minilm.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=normalize)
    got = enc.encode(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    want_tokens = [len(ids) for ids in st_minilm.tokenizer(texts, add_special_tokens=True)["input_ids"]]
    assert enc.count_tokens(texts) == want_tokens
    assert enc.encode([]).shape == (0, 384)


def test_plain_pipeline_takes_only_what_it_computes_the_same(minilm, tmp_path):
    spec, _ = minilm
    assert plain_pipeline(Path(spec.path)) == ("mean", True)

    def variant(name, modules=None, pooling=None, st_config=None, prompts=None):
        folder = tmp_path / name
        shutil.copytree(spec.path, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        if modules is not None:
            (folder / "modules.json").write_text(json.dumps(modules))
        if pooling is not None:
            cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
            (folder / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, **pooling}))
        if st_config is not None:
            (folder / "sentence_bert_config.json").write_text(json.dumps(st_config))
        if prompts is not None:
            (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
        return plain_pipeline(folder)

    mods = json.loads((Path(spec.path) / "modules.json").read_text())
    assert variant("no-normalize", modules=mods[:2]) == ("mean", False)
    assert variant("cls", pooling={"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}) == ("cls", True)
    assert variant("max", pooling={"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}) is None
    assert variant("two-modes", pooling={"pooling_mode_cls_token": True}) is None
    assert variant("dense", modules=[*mods, {"idx": 3, "name": "3", "path": "3_Dense",
                                             "type": "sentence_transformers.models.Dense"}]) is None
    assert variant("lower", st_config={"max_seq_length": 256, "do_lower_case": True}) is None
    assert variant("model-args", st_config={"max_seq_length": 256, "model_args": {"trust_remote_code": True}}) is None
    assert variant("prompt", prompts={"prompts": {"query": "query: "}, "default_prompt_name": "query"}) is None
    assert variant("prompts-unused", prompts={"prompts": {"query": "query: "}, "default_prompt_name": None}) == \
        ("mean", True)


def test_other_pipelines_go_through_sentence_transformers(minilm, st_minilm, tmp_path):
    """A max-pooling copy of the model: not plain, so QueryEncoder runs sentence-transformers (same result)."""
    spec, _ = minilm
    folder = tmp_path / "max-pooling"
    shutil.copytree(spec.path, folder)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "pooling_mode_mean_tokens": False,
                                                                  "pooling_mode_max_tokens": True}))
    other = resolve_embedder(str(folder))
    enc = QueryEncoder(manifest(other))
    assert enc.pooling is None and enc.dim == 384
    texts = ["Which NFL team won Super Bowl 50?", "a second, longer input about the Normans and their leader"]
    want = load_sentence_transformer(other).encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(enc.encode(texts), want, atol=1e-6)
    assert not np.allclose(enc.encode(texts), st_minilm.encode(texts, normalize_embeddings=True), atol=1e-3)
