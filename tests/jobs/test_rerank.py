"""The optional re-ranking stage: a cross-encoder named by a local folder re-scores the top candidates."""

import numpy as np
import pytest

from configs.errors import RagtuneError
from jobs.search import Reranker, search_texts
from models.embedders import resolve_embedder
from sharding.search import ShardedIndex
from tests.sharding.test_lexical import build_with_texts, texts_for


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A randomly initialised one-layer BERT cross-encoder with the bundled MiniLM tokenizer: nothing downloaded."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(resolve_embedder("all-MiniLM-L6-v2").path)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=1,
                                                     max_position_embeddings=128))
    out = tmp_path_factory.mktemp("cross-encoder")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_missing_reranker_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RagtuneError, match=r"--rerank .*nothing-here'?: no such folder. Fix: give a local"):
        Reranker(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagtuneError, match="not a loadable CrossEncoder"):
        Reranker(str(tmp_path / "empty"))


@pytest.mark.timeout(300)
def test_reranker_reorders_the_candidates_by_its_scores(tiny_cross_encoder, tmp_path):
    uri, _, _ = build_with_texts(tmp_path / "idx", texts_for(200), 2)
    index = ShardedIndex.open(uri)
    queries = ["w1 w2 running", "w3 cats"]
    reranker = Reranker(tiny_cross_encoder, depth=20)
    before = search_texts(index, None, queries, 20, mode="lexical")
    after = search_texts(index, None, queries, 5, mode="lexical", reranker=reranker)
    for q, b, a in zip(queries, before, after, strict=True):
        scores = dict(zip([h["chunk_id"] for h in b], reranker.model.predict([(q, h["text"]) for h in b]).tolist(),
                          strict=True))
        fifth = sorted(scores.values(), reverse=True)[4]
        # the 5 best by the cross-encoder, best first (1e-5: batches pad differently, so scores move by ~1e-7)
        assert [h["rank"] for h in a] == [1, 2, 3, 4, 5] and all(scores[h["chunk_id"]] >= fifth - 1e-5 for h in a)
        assert all(x["score"] >= y["score"] for x, y in zip(a, a[1:], strict=False))
        assert np.allclose([h["score"] for h in a], [scores[h["chunk_id"]] for h in a], atol=1e-5)
    assert any([h["chunk_id"] for h in a] != [h["chunk_id"] for h in b[:5]]
               for a, b in zip(after, before, strict=True))
