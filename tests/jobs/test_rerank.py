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
    """A one-layer BERT cross-encoder (the bundled MiniLM tokenizer, nothing downloaded) whose preference is known
    without running it: its score grows with the share of the token `cats` among the pair's tokens. Every weight
    is zero but: the embedding of `cats` (3 v, v = e0 - e1), identity value, attention-output and pooler maps, and
    a classifier reading v. Queries and keys are zero, so the [CLS] row attends to every token alike and receives
    (share of `cats`) * 3 v; LayerNorms with a wide epsilon and a matching weight pass it on nearly unchanged."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(resolve_embedder("all-MiniLM-L6-v2").path)
    h, eps = 16, 1e4
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=h, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4,
        num_labels=1, max_position_embeddings=512, layer_norm_eps=eps, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    v = torch.zeros(h)
    v[0], v[1] = 1.0, -1.0
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.bert.embeddings.word_embeddings.weight[tok.convert_tokens_to_ids("cats")] = 3 * v
        for ln in (model.bert.embeddings.LayerNorm, layer.attention.output.LayerNorm, layer.output.LayerNorm):
            ln.weight.fill_(eps ** 0.5)  # (x - mean) / sqrt(var + eps) * sqrt(eps) ~ x for the small x here
        for dense in (layer.attention.self.value, layer.attention.output.dense, model.bert.pooler.dense):
            dense.weight.copy_(torch.eye(h))
        model.classifier.weight[0] = v
    out = tmp_path_factory.mktemp("cross-encoder")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def cats_share(query, text):
    """What the cross-encoder above prefers, counted without it: the share of `cats` among the pair's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_embedder("all-MiniLM-L6-v2").path)
    ids = tok(query, text)["input_ids"]
    return ids.count(tok.convert_tokens_to_ids("cats")) / len(ids)


def test_a_missing_reranker_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RagtuneError, match=r"--rerank .*nothing-here'?: no such folder. Fix: give a local"):
        Reranker(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagtuneError, match="not a loadable CrossEncoder"):
        Reranker(str(tmp_path / "empty"))


@pytest.mark.timeout(300)
def test_reranker_reorders_the_candidates_by_its_scores(tiny_cross_encoder, tmp_path):
    """The re-ranked top 5 are the candidates the cross-encoder prefers (the largest share of `cats`, counted
    without the model), best first, with the cross-encoder's own scores; it changes the lexical order."""
    uri, _, _ = build_with_texts(tmp_path / "idx", texts_for(200), 2)
    index = ShardedIndex.open(uri)
    queries = ["w1 running cats", "w3 cats"]
    reranker = Reranker(tiny_cross_encoder, depth=20)
    before = search_texts(index, None, queries, 20, mode="lexical")
    after = search_texts(index, None, queries, 5, mode="lexical", reranker=reranker)
    for q, b, a in zip(queries, before, after, strict=True):
        share = {h["chunk_id"]: cats_share(q, h["text"]) for h in b}
        fifth = sorted(share.values(), reverse=True)[4]
        assert share[a[0]["chunk_id"]] > min(share.values()), q  # the candidates are not all alike to it
        assert [h["rank"] for h in a] == [1, 2, 3, 4, 5] and all(share[h["chunk_id"]] >= fifth for h in a), q
        assert all(share[x["chunk_id"]] >= share[y["chunk_id"]] for x, y in zip(a, a[1:], strict=False)), q
        assert all(x["score"] >= y["score"] for x, y in zip(a, a[1:], strict=False))
        own = reranker.model.predict([(q, h["text"]) for h in a])  # D: the cross-encoder's scores
        assert np.allclose([h["score"] for h in a], own, atol=1e-5)
    assert any([h["chunk_id"] for h in a] != [h["chunk_id"] for h in b[:5]]
               for a, b in zip(after, before, strict=True))
