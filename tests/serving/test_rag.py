"""The answering path without Serve: prompt assembly and truncation, the fan-out merge and filters, and the
request schemas and limits of the HTTP API."""

import json
import pickle

import numpy as np
import pytest

from configs.schema.serve import GenerationDefaults, LimitsConfig, PromptConfig
from serving.rag import build_prompt, matches, passages_from, render, sampling_params, search_k, widen_k
from serving.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SearchRequest,
    check_chat,
    check_embeddings,
    check_search,
    find_api_error,
)
from sharding.search import exact_knn, merge_topk

CFG = PromptConfig()


def passage(rank, text, title="T", doc="d"):
    return {"rank": rank, "score": 1.0 - rank / 10, "chunk_id": 100 + rank, "doc_id": f"{doc}{rank}", "title": title,
            "text": text, "metadata": {}}


def tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


# --- prompt -----------------------------------------------------------------------------------------------------------

def test_passages_are_numbered_into_the_last_user_message_after_a_system_message(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Where was Ana born?"}]
    p = build_prompt(tiny_tokenizer, msgs, [passage(1, "Ana was born in Ophir."), passage(2, "Zal3 is far.")], CFG,
                     context=512, max_tokens=16)
    assert [x["n"] for x in p.passages] == [1, 2] and p.dropped_passages == 0
    assert p.text.startswith("<|system|>\n" + CFG.system)
    assert "[1] T\nAna was born in Ophir.\n\n[2] T\nZal3 is far.\n\nQuestion: Where was Ana born?" in p.text
    assert p.text.endswith("<|assistant|>\n")
    assert p.ids == tiny_tokenizer(p.text, add_special_tokens=False)["input_ids"]
    plain = build_prompt(tiny_tokenizer, msgs, [], CFG, context=512, max_tokens=16)  # retrieval off: as sent
    assert plain.text == "<|user|>\nWhere was Ana born?<|end|>\n<|assistant|>\n" and plain.passages == []


def test_a_system_message_of_the_request_is_kept(tiny_tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    p = build_prompt(tiny_tokenizer, msgs, [passage(1, "x")], CFG, context=512, max_tokens=16)
    assert p.text.startswith("<|system|>\nBe brief.<|end|>") and CFG.system not in p.text


def test_truncation_cuts_the_lowest_ranked_passage_then_drops_it(tiny_tokenizer):
    tok = tiny_tokenizer
    long = " ".join(f"Zal{i} has its capital at Ophir{i % 7}." for i in range(40))
    msgs = [{"role": "user", "content": "What is the capital of Zal3?"}]
    ps = [passage(1, "Short one."), passage(2, long), passage(3, long)]
    full = len(render(tok, [{"role": "user", "content": "x"}])[1])  # template overhead, for scale
    assert full < 20
    p = build_prompt(tok, msgs, ps, CFG, context=300, max_tokens=40)
    assert len(p.ids) + 40 <= 300
    # passage 3 could not keep min_passage_tokens: dropped; passage 2 cut to fit and marked
    assert [x["rank"] for x in p.passages] == [1, 2] and p.dropped_passages == 1
    assert p.passages[1]["truncated"] and long.startswith(p.passages[1]["text"])
    assert tokens(tok, p.passages[1]["text"]) >= CFG.min_passage_tokens
    assert p.passages[0]["text"] == "Short one." and not p.passages[0].get("truncated")
    # the cut leaves little unused: one more token of passage 2 would not fit
    more = dict(ps[1], text=tok.decode(tok(long, add_special_tokens=False)["input_ids"][
        :tokens(tok, p.passages[1]["text"]) + 4]))
    assert len(build_prompt(tok, msgs, [ps[0], more], CFG, context=10_000, max_tokens=40).ids) + 40 > 300


def test_older_turns_go_before_passages_and_a_question_too_long_is_a_400(tiny_tokenizer):
    tok = tiny_tokenizer
    old = " ".join(["an earlier turn about Zal and Ophir"] * 30)
    msgs = [{"role": "user", "content": old}, {"role": "assistant", "content": old},
            {"role": "user", "content": "And Zal3?"}]
    p = build_prompt(tok, msgs, [passage(1, "Zal3 is in Ophir3.")], CFG, context=200, max_tokens=32)
    assert p.dropped_turns == 2 and p.dropped_passages == 0 and old not in p.text
    with pytest.raises(ApiError) as e:
        build_prompt(tok, [{"role": "user", "content": old * 3}], [passage(1, "x")], CFG, context=200, max_tokens=32)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded" and "context is 200" in e.value.message


def test_sampling_defaults_fill_what_the_request_leaves_out():
    d = GenerationDefaults(max_tokens=50, temperature=0.3, top_p=0.9)
    p = sampling_params(d, max_tokens=None, temperature=None, top_p=None, stop=["\n"], seed=3)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (50, 0.3, 0.9, ("\n",), 3)
    p = sampling_params(d, max_tokens=5, temperature=0.0, top_p=1.0)
    assert (p.max_tokens, p.temperature, p.top_p) == (5, 0.0, 1.0)


# --- fan-out merge and filters ----------------------------------------------------------------------------------------

class _Store:
    """A docstore stand-in: rows by chunk id (Docstore's lookup contract)."""

    def __init__(self, rows):
        self.rows = rows

    def lookup(self, ids, columns=None):
        return {int(i): self.rows[int(i)] for i in ids if int(i) in self.rows}


def test_shard_group_results_merge_to_the_exact_top_k_of_all_vectors():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((300, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:5] + 0.1 * rng.standard_normal((5, 16)).astype(np.float32)
    ids = rng.permutation(10**6)[:300]  # chunk ids, not row numbers
    D_true, I_true = exact_knn(xq, xb, 10, "inner_product")
    groups = [np.arange(0, 120), np.arange(120, 200), np.arange(200, 300)]  # uneven shard groups
    Ds, Is = [], []
    for g in groups:
        D, I = exact_knn(xq, xb[g], 10, "inner_product")
        Ds.append(D)
        Is.append(np.where(I >= 0, ids[g][I], -1))
    D, I = merge_topk(Ds, Is, 10, "inner_product")
    assert (I == ids[I_true]).all() and np.allclose(D, D_true)
    rows = {int(c): {"chunk_id": int(c), "doc_id": f"doc{int(c) % 3}", "title": "t", "text": f"text {c}",
                     "metadata": json.dumps({"lang": "en" if c % 2 else "fr"})} for c in ids}
    hits = passages_from(D[0], I[0], _Store(rows), 4)
    assert [h["chunk_id"] for h in hits] == I[0, :4].tolist() and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert hits[0]["metadata"]["lang"] in ("en", "fr") and hits[0]["text"] == f"text {I[0, 0]}"
    fr = passages_from(D[0], I[0], _Store(rows), 3, {"lang": "fr"})
    want = [int(c) for c in I[0] if c % 2 == 0][:3]
    assert [h["chunk_id"] for h in fr] == want and [h["rank"] for h in fr] == list(range(1, len(want) + 1))


def test_filters_match_columns_metadata_and_lists():
    row = {"doc_id": "a", "title": "T", "metadata": json.dumps({"lang": "en", "year": 2020})}
    assert matches(row, {"doc_id": "a"}) and matches(row, {"lang": "en", "year": 2020})
    assert matches(row, {"year": [2019, 2020]}) and not matches(row, {"year": 2019})
    assert not matches(row, {"missing": "x"}) and not matches({"metadata": "not json"}, {"lang": "en"})


def test_a_filter_searches_more_candidates():
    assert search_k(5, None, 1000, 10) == 5
    assert search_k(5, {"lang": "en"}, 1000, 10) == 50
    assert search_k(5, {"lang": "en"}, 20, 10) == 20 and search_k(5, {"x": 1}, 3, 10) == 5
    # too few passed: 4x more candidates, up to every vector or filter_max_candidates; done once k passed
    assert widen_k(50, 5, 2, {"lang": "en"}, 1000, 10_000) == 200
    assert widen_k(800, 5, 2, {"lang": "en"}, 1000, 10_000) == 1000
    assert widen_k(1000, 5, 2, {"lang": "en"}, 1000, 10_000) is None
    assert widen_k(50, 5, 2, {"lang": "en"}, 10**6, 100) == 100 and widen_k(100, 5, 2, {"x": 1}, 10**6, 100) is None
    assert widen_k(50, 5, 5, {"lang": "en"}, 1000, 10_000) is None and widen_k(5, 5, 2, None, 1000, 10_000) is None


# --- request schemas and limits ---------------------------------------------------------------------------------------

def test_chat_requests_parse_openai_shapes_and_the_retrieval_extension():
    r = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "developer", "content": "sys"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "stop": "\n", "user": "ignored", "presence_penalty": 0})
    assert [m.plain() for m in r.messages] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"}]
    assert r.max_new_tokens() == 7 and r.stops() == ["\n"] and r.retrieval_options().enabled
    assert not ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                     "retrieval": False}).retrieval_options().enabled
    opts = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                 "retrieval": {"k": 2, "filter": {"lang": ["en", "fr"]}}})
    assert opts.retrieval_options().k == 2 and opts.retrieval_options().filter == {"lang": ["en", "fr"]}


@pytest.mark.parametrize("body, where", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "n": 2}, "n > 1"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "q"}]}, "last message"),
    ({"model": "m", "messages": [{"role": "tool", "content": "q"}]}, "role"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text content"),
    ({"messages": [{"role": "user", "content": "q"}]}, "model"),
])
def test_malformed_chat_requests_are_refused(body, where):
    with pytest.raises(ValueError, match=where):
        ChatCompletionRequest.model_validate(body)


def test_limits_are_400s_that_name_the_limit():
    limits = LimitsConfig(max_messages=2, max_tokens=10, max_k=5, max_input_chars=20, max_stop=1)
    ok = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    check_chat(ChatCompletionRequest.model_validate(ok), limits)
    cases = [({"max_tokens": 11}, "max_tokens"), ({"messages": [{"role": "user", "content": "q"}] * 3}, "messages"),
             ({"messages": [{"role": "user", "content": "q" * 21}]}, "messages"),
             ({"retrieval": {"k": 6}}, "retrieval.k"), ({"stop": ["a", "b"]}, "stop"), ({"stop": [""]}, "stop"),
             ({"messages": [{"role": "user", "content": "  "}]}, "messages")]
    for extra, param in cases:
        with pytest.raises(ApiError) as e:
            check_chat(ChatCompletionRequest.model_validate({**ok, **extra}), limits)
        assert e.value.status == 400 and e.value.param == param, extra
        body = e.value.body()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(ApiError, match=r"k \(6\) exceeds this server's limit of 5 \(limits.max_k\)"):
        check_search(SearchRequest(query="q", k=6), limits)
    with pytest.raises(ApiError, match="inputs"):
        check_embeddings(EmbeddingRequest(model="m", input=["a"] * 300), LimitsConfig())
    with pytest.raises(ValueError, match="one prompt per request"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


def test_api_errors_survive_pickling_and_are_found_behind_wrappers():
    e = ApiError(404, "no such model", param="model", code="model_not_found")
    back = pickle.loads(pickle.dumps(e))
    assert (back.status, back.message, back.param, back.code, back.type) == (404, "no such model", "model",
                                                                             "model_not_found", e.type)

    class Wrapper(Exception):  # Ray's RayTaskError keeps the user's exception in `cause`
        def __init__(self, cause):
            self.cause = cause

    assert find_api_error(Wrapper(back)) is back
    try:
        try:
            raise back
        except ApiError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        assert find_api_error(outer) is back
    assert find_api_error(RuntimeError("other")) is None
