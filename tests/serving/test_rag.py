"""The answering path without Serve: prompt assembly and truncation, the fan-out merge and filters, and the
request schemas and limits of the HTTP API."""

import json
import pickle
import platform
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from configs.errors import Conflict, InvalidRequest, NotFound, RagtuneError, Unavailable
from configs.schema.serve import (
    GenerationDefaults,
    IndexSource,
    LimitsConfig,
    PromptConfig,
    RetrievalConfig,
    ServeJobConfig,
)
from models.prompt import build_prompt, render
from serving.ingress import ApiError, api_error
from serving.rag import passages_from, sampling_params, search_k, widen_k
from serving.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SearchRequest,
    check_chat,
    check_embeddings,
    check_search,
    json_depth,
)
from sharding.filters import matches
from sharding.search import merge_topk
from sharding.tuning import exact_knn

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
    with pytest.raises(InvalidRequest) as e:
        build_prompt(tok, [{"role": "user", "content": old * 3}], [passage(1, "x")], CFG, context=200, max_tokens=32)
    assert api_error(e.value).status == 400 and e.value.code == "context_length_exceeded"
    assert "context is 200" in e.value.message


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
    hits = [h.model_dump() for h in passages_from(D[0], I[0], _Store(rows), 4)]
    assert [h["chunk_id"] for h in hits] == I[0, :4].tolist() and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert hits[0]["metadata"]["lang"] in ("en", "fr") and hits[0]["text"] == f"text {I[0, 0]}"
    fr = [h.model_dump() for h in passages_from(D[0], I[0], _Store(rows), 3, {"lang": "fr"})]
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
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "response_format": {"type": "json_object"}},
     "'json_object' is not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": "q"}], "response_format": {"type": "yaml"}},
     "response_format.type"),
])
def test_malformed_chat_requests_are_refused(body, where):
    with pytest.raises(ValueError, match=where):
        ChatCompletionRequest.model_validate(body)


def test_json_depth_counts_nesting_outside_strings_before_parsing():
    assert json_depth(b'{"a": [1, {"b": "[[[[{{"}]}') == 3  # brackets inside strings do not nest
    assert json_depth(b'{"q": "say \\"[[[\\" twice", "k": [[]]}') == 3  # nor after an escaped quote
    assert json_depth(b'"x"') == 0 and json_depth(b"{}") == 1 and json_depth(b"[[],[],[]]") == 2
    assert json_depth(b"[" * 5000) == 5000 and json_depth(b'{"a":' * 5000) == 5000  # json.loads: RecursionError
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "[{" * 100}]}).encode()
    assert json_depth(body) == 3 and json.loads(body)


def test_limits_are_400s_that_name_the_limit():
    limits = LimitsConfig(max_messages=2, max_tokens=10, max_k=5, max_input_chars=20, max_stop=1)
    ok = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    check_chat(ChatCompletionRequest.model_validate(ok), limits)
    cases = [({"max_tokens": 11}, "max_tokens"), ({"messages": [{"role": "user", "content": "q"}] * 3}, "messages"),
             ({"messages": [{"role": "user", "content": "q" * 21}]}, "messages"),
             ({"retrieval": {"k": 6}}, "retrieval.k"), ({"stop": ["a", "b"]}, "stop"), ({"stop": [""]}, "stop"),
             ({"messages": [{"role": "user", "content": "  "}]}, "messages")]
    for extra, param in cases:
        with pytest.raises(InvalidRequest) as e:
            check_chat(ChatCompletionRequest.model_validate({**ok, **extra}), limits)
        assert api_error(e.value).status == 400 and e.value.param == param, extra
        body = api_error(e.value).body()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    with pytest.raises(InvalidRequest, match=r"k \(6\) exceeds this server's limit of 5 \(limits.max_k\)"):
        check_search(SearchRequest(query="q", k=6), limits)
    with pytest.raises(InvalidRequest, match="inputs"):
        check_embeddings(EmbeddingRequest(model="m", input=["a"] * 300), LimitsConfig())
    with pytest.raises(ValueError, match="one prompt per request"):
        CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]})


def test_a_route_whose_requests_queue_past_the_latency_target_admits_fewer_and_more_again_as_they_speed_up():
    from serving.ingress import Admission

    now = [0.0]
    adm = Admission(100, target=5.0, clock=lambda: now[0])  # request_timeout_s 10 x latency_target_share 0.5
    slots = [adm.take("search") for _ in range(40)]  # at once; the replica answers 4 a second, in order
    search = adm.routes["search"]
    for i in range(1, 21):  # the first 20 wait 5 s at most: within the target
        now[0] = 0.25 * i
        slots[i - 1].release()
    assert search.limit == 100 and adm.in_flight == 20
    now[0] = 0.25 * 21  # the 21st took 5.25 s, 21x its fastest peer: it waited in a queue
    slots[20].release()
    assert search.limit == int(21 * 5.0 / 5.25) == 20  # what finishes within 5 s at 4 a second
    late = adm.take("search")
    with pytest.raises(ApiError) as e:  # 20 in flight: refused at once, not answered with a 504 later
        adm.take("search")
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert "search requests wait in a queue" in e.value.message and "limits.latency_target_share" in e.value.message
    with adm.take("chat"):  # another route has its own limit
        pass
    for i in range(22, 41):  # the rest of the queue finishes as late, admitted beside the 21st
        now[0] = 0.25 * i
        slots[i - 1].release()
    assert search.limit == 20  # and lowers the limit no further
    now[0] += 0.1
    late.release()  # admitted after the queue had formed: within the target again
    start = now[0]
    for _ in range(10):  # each request done within the target admits one more, up to max_concurrent_requests
        with adm.take("search"):
            now[0] += 0.1
    assert now[0] - start == pytest.approx(1.0) and search.limit == 20 + 11 and adm.in_flight == 0


def test_a_surge_is_refused_ahead_once_the_queue_would_wait_past_the_target_and_a_light_load_never_is():
    from collections import deque

    from serving.ingress import Admission

    now = [0.0]
    adm = Admission(10_000, target=5.0, clock=lambda: now[0])
    search = adm.route("search")
    for _ in range(100):  # light: one request every 0.2 s, each done in 0.05 s (busy a quarter of the time)
        with adm.take("search"):
            now[0] += 0.05
        now[0] += 0.15
    assert search.wait() is None and search.limit == 10_000
    queue: deque = deque()  # a surge: 60 requests/s arrive, the replica finishes 20/s, in order
    waited, refused, first_refusal = [], 0, None
    for step in range(400):  # 20 s in steps of 0.05 s
        now[0] += 0.05
        if queue:
            slot, since = queue.popleft()
            slot.release()
            waited.append(now[0] - since)
        if step < 200:  # the surge lasts 10 s
            for _ in range(3):
                try:
                    queue.append((adm.take("search"), now[0]))
                except ApiError as e:
                    assert e.status == 429 and "would keep a new one waiting" in e.message
                    refused += 1
                    first_refusal = first_refusal or now[0]
    assert first_refusal is not None and 2.0 < first_refusal - 20.0 < 4.0  # once the queue holds ~5 s of work
    assert refused > 200 and max(waited) <= 5.0 + 0.2  # nobody admitted waited much past the target (not 10 s)


def test_a_request_slow_by_itself_lowers_no_limit_so_a_light_load_is_never_refused():
    from serving.ingress import RouteLimit

    r = RouteLimit(256, target=5.0)
    for _ in range(20):  # long generations, one at a time: as slow as their fastest peer, nothing queued
        r.done(7.0, admitted_with=1, now=0.0)
    assert r.limit == 256
    r.done(15.0, admitted_with=30, now=0.0)  # over twice the fastest: queued behind the others
    assert r.limit == 10
    r.done(0.01, admitted_with=1, now=0.0)
    assert r.limit == 11
    for _ in range(300):
        r.done(0.01, admitted_with=1, now=0.0)
    assert r.limit == 256
    r.done(60.0, admitted_with=1, now=0.0)  # admitted alone: nothing of its route queued ahead of it
    assert r.limit == 256
    r.done(60.0, admitted_with=2, now=0.0)  # the limit never falls below 1
    assert r.limit == 1


def test_a_burst_that_is_over_gives_its_freed_memory_back_once():
    from serving.deployments import BURST
    from serving.ingress import Admission

    calls = []
    adm = Admission(1000, after_burst=lambda: calls.append(adm.in_flight))
    light = [adm.take("search") for _ in range(BURST - 1)]  # below a burst: never
    for s in light:
        s.release()
    assert calls == []
    slots = [adm.take("search") for _ in range(2 * BURST)]  # 128 at once, then down to an eighth of them
    for s in slots[:-17]:
        s.release()
    assert calls == [] and adm.in_flight == 17
    slots[-17].release()
    assert calls == [16]
    for s in slots[-16:]:
        s.release()
    assert calls == [16] and adm.in_flight == 0  # once per burst


def test_a_replica_that_keeps_answering_without_a_burst_gives_freed_memory_back_every_30_seconds():
    from serving.deployments import TRIM_EVERY_S, Bursts

    now, calls = [0.0], []
    bursts = Bursts(lambda: calls.append(now[0]), clock=lambda: now[0])
    for _ in range(200):  # 20 s of requests, 8 at once at most: no burst, not yet a trim
        for _ in range(8):
            bursts.enter()
        for _ in range(8):
            bursts.leave()
        now[0] += 0.1
    assert calls == []
    while now[0] < 95.0:
        bursts.enter()
        bursts.leave()
        now[0] += 0.1
    assert calls == pytest.approx([30.0, 60.0, 90.0], abs=0.11)  # every TRIM_EVERY_S of requests
    now[0] += 1000.0  # idle: nothing to give back, no call (no request ends)
    assert len(calls) == 3 and TRIM_EVERY_S == 30.0


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's, and the resident memory is read from /proc")
def test_freed_heap_pages_go_back_to_the_system():
    from serving.deployments import give_back_freed_memory

    def anon() -> int:
        return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    blocks = [bytes(8192) for _ in range(20_000)]  # 160 MiB from malloc's heap (under its mmap threshold)
    kept = blocks[::64]  # live objects between the freed ones: the heap's top cannot shrink
    del blocks
    held = anon()
    assert give_back_freed_memory()
    assert held - anon() > 100 * 2**20, (held, anon())
    assert len(kept) == 313


def test_no_latency_target_keeps_only_the_replica_limit():
    from serving.ingress import Admission

    now = [0.0]
    adm = Admission(3, target=0.0, clock=lambda: now[0])
    slots = [adm.take("search") for _ in range(3)]
    now[0] = 100.0
    for s in slots:
        s.release()
    assert adm.routes["search"].limit == 3 and len(adm.routes["search"].recent) == 0
    assert [adm.take("search") for _ in range(3)]


def test_admission_refuses_past_its_limit_until_a_slot_is_released_and_overload_is_a_503_to_retry():
    import asyncio

    from ray.serve.exceptions import BackPressureError

    from serving.ingress import Admission, _api_error, overloaded

    adm = Admission(2)
    first, second = adm.take(), adm.take()
    with pytest.raises(ApiError) as e:
        adm.take()
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded" and adm.in_flight == 2
    held = second.hand_over()  # a stream's response takes the place over
    second.release()
    assert adm.in_flight == 2  # the old owner releases nothing
    held.release()
    held.release()  # once only
    assert adm.in_flight == 1
    with adm.take():
        assert adm.in_flight == 2
    first.release()
    assert adm.in_flight == 0

    class Wrapper(Exception):  # Ray's RayTaskError keeps the user's exception in `cause`
        def __init__(self, cause):
            self.cause = cause

    busy = overloaded(Wrapper(BackPressureError(num_queued_requests=64, max_queued_requests=64)))
    assert busy is not None and busy.status == 503 and busy.code == "overloaded"
    assert overloaded(RuntimeError("other")) is None
    for err, retry in ((busy, "1"), (ApiError(429, "slow down"), "1"), (ApiError(400, "bad"), None)):
        response = asyncio.run(_api_error(None, err))
        assert response.status_code == err.status and response.headers.get("retry-after") == retry
        assert json.loads(response.body)["error"]["message"] == err.message


def test_a_request_done_in_steps_has_one_deadline_for_all_of_them():
    """Chat retrieves, then generates: each step used to get the whole limits.request_timeout_s, so a chat could
    take twice it (and Serve's proxy answered 408 at limit + 5 s before the Ingress' 504). With the request's
    deadline, two steps of 0.6 x the limit are a 504 in the second one, and it is counted under that route."""
    import asyncio
    import time
    from types import SimpleNamespace

    from configs.schema.serve import LimitsConfig
    from serving.ingress import Ingress, Metrics

    me = SimpleNamespace(limits=LimitsConfig(request_timeout_s=0.5), metrics=Metrics())
    timed = Ingress.func_or_class._timed

    async def step(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    async def request() -> tuple[str, float]:
        deadline = time.perf_counter() + me.limits.request_timeout_s
        t0 = time.perf_counter()
        first = await timed(me, "chat.prepare", step(0.3), deadline)
        try:
            await timed(me, "chat", step(0.3), deadline)
        except ApiError as e:
            return f"{first}, then {e.status}", time.perf_counter() - t0
        return f"{first}, then done", time.perf_counter() - t0

    outcome, seconds = asyncio.run(request())
    assert outcome == "done, then 504" and seconds < 0.5 + 0.1
    assert me.metrics.requests.labels("chat", "504")._value.get() == 1
    assert me.metrics.requests.labels("chat.prepare", "200")._value.get() == 1
    assert asyncio.run(timed(me, "search", step(0.3))) == "done"  # one step: the whole limit, as before
    with pytest.raises(ApiError) as e:  # a deadline already past: a 504 at once, the work never left waiting
        asyncio.run(timed(me, "chat", step(0.01), time.perf_counter() - 1))
    assert e.value.status == 504 and e.value.code == "timeout"


def test_errors_survive_pickling_and_the_ingress_finds_their_status_behind_wrappers():
    e = NotFound("no such model", param="model", code="model_not_found")
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.message, back.param, back.code) == (NotFound, "no such model", "model", "model_not_found")

    class Wrapper(Exception):  # Ray's RayTaskError keeps the user's exception in `cause`
        def __init__(self, cause):
            self.cause = cause

    api = api_error(Wrapper(back))
    assert (api.status, api.message, api.param, api.code, api.type) == (404, "no such model", "model",
                                                                        "model_not_found", "invalid_request_error")
    try:
        try:
            raise back
        except NotFound as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as outer:
        assert api_error(outer).status == 404
    assert [api_error(k("m")).status for k in (InvalidRequest, Conflict, Unavailable)] == [400, 409, 503]
    own = ApiError(413, "too large")
    assert api_error(own) is own and api_error(RuntimeError("other")) is None
    assert api_error(RagtuneError("a shard file is missing")) is None  # not the request's fault: a 500


# --- search modes: dense, lexical, hybrid -----------------------------------------------------------------------------

def build_texts_version(root, texts, num_shards, lexical=True):
    """A Flat version of random vectors whose docstore holds ``texts``, titles and metadata, with BM25 shards."""
    import pyarrow as pa

    from sharding.docstore import write_docstore
    from sharding.manifest import read_index_manifest, write_index_manifest
    from tests.sharding.test_index import build_version, chunk_ids, normalized
    from tests.sharding.test_lexical import add_lexical

    n = len(texts)
    xb = normalized(np.random.default_rng(0).normal(size=(n, 16)))
    ids = chunk_ids(n)
    vdir = build_version(root, xb, ids, "Flat", num_shards)
    m = read_index_manifest(vdir)
    for rec in m.shards:
        (p,) = rec.pieces
        rows = pa.table({"chunk_id": ids[p.start:p.stop], "doc_id": [f"d{i}" for i in range(p.start, p.stop)],
                         "title": [f"t{i % 7}" for i in range(p.start, p.stop)], "text": texts[p.start:p.stop],
                         "metadata": [json.dumps({"lang": ["en", "fr", "de"][i % 3]}) for i in range(p.start, p.stop)]})
        rec.docstore_sha256, rec.docstore_bytes = write_docstore(rows, vdir.join(rec.docstore))
    write_index_manifest(vdir, m)
    if lexical:
        add_lexical(vdir)
    return vdir.uri, xb, ids


@pytest.fixture(scope="module")
def texts_index(tmp_path_factory):
    """400 chunks in 3 shards (with BM25 shards), the same chunks without a lexical part, and 12 queries."""
    from tests.sharding.test_lexical import texts_for

    texts = texts_for(400)
    path, xb, ids = build_texts_version(tmp_path_factory.mktemp("lex"), texts, 3)
    dense_only, _, _ = build_texts_version(tmp_path_factory.mktemp("dense"), texts, 2, lexical=False)
    queries = [" ".join(q.split()[:4]) for q in texts_for(12, seed=1)]
    xq = normalized_queries(xb, len(queries))
    return {"path": path, "dense_only": dense_only, "queries": queries, "xq": xq}


def normalized_queries(xb, n):
    x = xb[:n] + 0.3 * np.random.default_rng(2).normal(size=(n, xb.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class _Encoder:
    """QueryEncoder stand-in: the synthetic index's query vector for each query text."""

    def __init__(self, queries, xq):
        self.vectors = dict(zip(queries, xq, strict=True))

    def encode(self, texts):
        return np.stack([self.vectors[t] for t in texts])


MODE_CASES = [("dense", {}), ("lexical", {}), ("hybrid", {}), ("hybrid", {"weight": 0.3, "depth": 20}),
              ("hybrid", {"method": "rrf", "rrf_k": 10.0})]


@pytest.mark.parametrize("mode, overrides", MODE_CASES)
def test_shard_groups_ranked_apart_then_combined_equal_one_search_of_the_whole_index(texts_index, mode, overrides):
    """What the ShardSearchers (group_rankings) and the Retriever (combine) do equals sharding.search.search."""
    from serving.rag import RANKINGS, combine, group_rankings, make_fusion, ranking_depth
    from sharding.search import ShardedIndex, search

    full = ShardedIndex.open(texts_index["path"])
    groups = [ShardedIndex.open(texts_index["path"], only=[0]), ShardedIndex.open(texts_index["path"], only=[1, 2])]
    fusion = make_fusion(None, overrides)
    xq, texts = texts_index["xq"], texts_index["queries"]
    for kk in (5, 150):  # 150 > the fusion depth: each ranking goes kk deep
        depth = ranking_depth(mode, kk, fusion)
        results = [group_rankings(g, xq, texts, depth, RANKINGS[mode]) for g in groups]
        D, I = combine(results, mode, kk, full.manifest.metric, fusion)
        D1, I1 = search(full, xq, texts, kk, mode, fusion)
        assert np.array_equal(I, I1) and np.allclose(D, D1), (mode, kk)
    if mode == "lexical":  # nothing embedded: the rankings need no vectors
        assert set(group_rankings(groups[0], None, texts, 5, RANKINGS[mode])) == {"lexical"}


@pytest.mark.parametrize("mode, overrides", MODE_CASES)
def test_local_retriever_answers_every_mode_with_filters_as_one_search(texts_index, mode, overrides):
    from serving.rag import LocalRetriever, make_fusion
    from sharding.search import ShardedIndex, search

    r = LocalRetriever(texts_index["path"], mode="lexical", overfetch=3)
    assert r.encoder is None  # lexical-only: no embedding model loaded
    r.encoder = _Encoder(texts_index["queries"], texts_index["xq"])
    full = ShardedIndex.open(texts_index["path"])
    fusion = make_fusion(None, overrides)
    for q, query in enumerate(texts_index["queries"][:6]):
        xq = texts_index["xq"][q:q + 1]
        got = [p.model_dump() for p in r.search(query, 4, mode=mode, fusion=overrides)]
        D, I = search(full, xq, [query], 4, mode, fusion)
        assert [p["chunk_id"] for p in got] == [c for c in I[0].tolist() if c >= 0]
        assert np.allclose([p["score"] for p in got], D[0][I[0] >= 0])
        assert {"doc_id", "title", "text", "metadata"} <= set(got[0]) and got[0]["metadata"]["lang"]
        # a filter: 4 x overfetch 3 = 12 candidates, then 4x more until 4 pass (or every chunk was a candidate)
        flt = {"lang": "de", "title": ["t1", "t2"]}
        got = [p.model_dump() for p in r.search(query, 4, flt, mode=mode, fusion=overrides)]
        for kk in (12, 48, 192, 400):
            D, I = search(full, xq, [query], kk, mode, fusion)
            rows = full.docstore().lookup(I[0][I[0] >= 0])
            want = [c for c in I[0].tolist() if c >= 0 and rows[c]["title"] in ("t1", "t2")
                    and json.loads(rows[c]["metadata"])["lang"] == "de"]
            if len(want) >= 4 or kk == 400:
                break
        assert [p["chunk_id"] for p in got] == want[:4] and [p["rank"] for p in got] == list(range(1, len(got) + 1))


def test_auto_mode_and_an_index_without_a_lexical_part(texts_index, tmp_path, monkeypatch):
    from configs.errors import RagtuneError
    from serving.app import ServeAppArgs, build_app, check_retrieval
    from serving.rag import LocalRetriever, resolve_mode
    from sharding.manifest import read_index_manifest, resolve_index

    with_lex = read_index_manifest(resolve_index(texts_index["path"]))
    without = read_index_manifest(resolve_index(texts_index["dense_only"]))
    assert resolve_mode("auto", with_lex, "v") == "hybrid" and resolve_mode("auto", without, "v") == "dense"
    assert [resolve_mode(m, with_lex, "v") for m in ("dense", "lexical", "hybrid")] == ["dense", "lexical", "hybrid"]
    assert resolve_mode("dense", without, "v") == "dense"
    for mode in ("lexical", "hybrid"):  # a request: 400, naming the field, the value and the fix
        with pytest.raises(InvalidRequest) as e:
            resolve_mode(mode, without, "file:///x/v-00001", "retrieval.mode")
        assert api_error(e.value).status == 400 and e.value.param == "retrieval.mode"
        assert e.value.code == "lexical_unavailable"
        assert f"retrieval.mode = {mode!r} needs a lexical (BM25) part, but index version file:///x/v-00001 has " \
               "none" in e.value.message and "Fix: use mode dense or auto" in e.value.message
    # start-up: the in-process retriever, and the app builder before any deployment
    with pytest.raises(RagtuneError, match=r"retrieval.mode = 'lexical' needs a lexical \(BM25\) part.*Fix"):
        LocalRetriever(texts_index["dense_only"], mode="lexical")
    cfg = ServeJobConfig.model_validate({"index": {"path": texts_index["dense_only"]},
                                         "generator": {"model": str(tmp_path)}, "retrieval": {"mode": "hybrid"}})
    with pytest.raises(RagtuneError, match=r"retrieval.mode = 'hybrid' needs a lexical \(BM25\) part.*Fix"):
        build_app(ServeAppArgs(config=cfg.model_dump(mode="json")))
    assert check_retrieval(cfg.model_copy(update={"retrieval": RetrievalConfig(mode="auto")})) == "dense"
    monkeypatch.setattr(LocalRetriever, "_load_encoder", lambda self: None)  # the synthetic index has no model
    r = LocalRetriever(texts_index["dense_only"], mode="auto")
    with pytest.raises(InvalidRequest, match="needs a lexical"):
        r.search("w1", 3, mode="lexical")


def test_a_reload_to_a_version_without_a_lexical_part_is_refused_when_the_mode_needs_one(tmp_path, monkeypatch):
    """retrieval.mode hybrid: a new version without BM25 shards is a 409, and the old version keeps serving.
    retrieval.mode auto: the Retriever switches to it and answers dense there (exactly the dense ranking of the
    version), where it answered hybrid before; a request for hybrid on it is a 400. The shard groups are real
    ShardSearchers, called in this process."""
    import asyncio
    import shutil

    from cluster.placement import ReplicaResources
    from serving.deployments import Retriever, ShardSearcher
    from serving.fused import Local
    from serving.rag import LocalRetriever
    from serving.schemas import Embedding
    from sharding.manifest import read_index_manifest, switch_latest, write_index_manifest
    from sharding.storage import resolve
    from tests.sharding.test_lexical import texts_for

    texts = texts_for(60)
    _, xb, _ = build_texts_version(tmp_path / "index", texts, 2)
    root = resolve(str(tmp_path / "index"))
    shutil.copytree(tmp_path / "index" / "v-00001", tmp_path / "index" / "v-00002")
    shutil.rmtree(tmp_path / "index" / "v-00002" / "lexical")  # only the manifest says so: no stray BM25 files
    m = read_index_manifest(root.join("v-00002"))
    write_index_manifest(root.join("v-00002"), m.model_copy(update={"lexical": None, "version": "v-00002"}))
    query = " ".join(texts[7].split()[:4])
    xq = normalized_queries(xb[7:8], 1)[0]

    class QueryEmbedder:  # the Embedder's answer for the query: the synthetic index has no model
        async def embed(self, text):
            return Embedding(vector=xq, tokens=4, batch=1)

    def want(version, mode):
        local = LocalRetriever(str(tmp_path / "index" / version), mode="auto")
        return [p.chunk_id for p in local.search(query, 5, mode=mode)]

    async def scenario(mode):  # one event loop for the deployments' objects, as in a replica
        switch_latest(root, "v-00001")
        source = IndexSource(path=str(tmp_path / "index"), poll_interval_s=None)
        res = ReplicaResources(num_cpus=1, num_gpus=0, threads=1, device="cpu")
        searchers = [Local(ShardSearcher.func_or_class(source, [g], res, mode)) for g in (0, 1)]
        r = Retriever.func_or_class(Local(QueryEmbedder()), searchers, source, RetrievalConfig(mode=mode))
        before = await r.search(query, 5)
        assert before.mode == "hybrid" and [p.chunk_id for p in before.passages] == want("v-00001", "hybrid")
        switch_latest(root, "v-00002")
        if mode == "hybrid":
            with pytest.raises(Conflict) as e:
                await r.reload()
            assert api_error(e.value).status == 409 and "retrieval.mode = 'hybrid' needs a lexical" in e.value.message
            assert r.version.endswith("v-00001") and (await r.search(query, 5)).mode == "hybrid"
            return
        reloaded = await r.reload()
        assert reloaded.changed and reloaded.version == "v-00002" and r.version.endswith("v-00002")
        after = await r.search(query, 5)
        assert after.mode == "dense" and after.version.endswith("v-00002")
        assert [p.chunk_id for p in after.passages] == want("v-00002", "dense") != want("v-00001", "hybrid")
        with pytest.raises(InvalidRequest, match="needs a lexical"):
            await r.search(query, 5, mode="hybrid")

    monkeypatch.setattr(LocalRetriever, "_load_encoder", lambda self: _Encoder([query], xq[None, :]))
    for mode in ("hybrid", "auto"):
        asyncio.run(scenario(mode))


# --- schemas: retrieval.mode and fusion in the config and in requests -------------------------------------------------

def test_retrieval_config_modes_fusion_and_their_limits():
    from configs.schema.base import ConfigError, validate
    from sharding.search import Fusion

    assert RetrievalConfig().mode == "auto"
    assert RetrievalConfig().fusion.model_dump() == vars(Fusion())  # one set of defaults, kept equal by this test
    base = {"index": {"path": "x"}, "generator": {"model": "m"}}
    ok = validate(ServeJobConfig, {**base, "retrieval": {"mode": "lexical", "fusion": {"method": "rrf"}}}, "t")
    assert ok.retrieval.mode == "lexical" and ok.retrieval.fusion.method == "rrf"
    cases = [({"retrieval": {"mode": "sparse"}}, "retrieval.mode = 'sparse'"),
             ({"retrieval": {"fusion": {"weight": 1.5}}}, "retrieval.fusion.weight = 1.5"),
             ({"retrieval": {"fusion": {"method": "max"}}}, "retrieval.fusion.method = 'max'"),
             ({"retrieval": {"fusion": {"rrf_k": 0}}}, "retrieval.fusion.rrf_k = 0"),
             ({"retrieval": {"fusion": {"depth": 0}}}, "retrieval.fusion.depth = 0"),
             ({"retrieval": {"fusion": {"wieght": 0.3}}}, "did you mean `weight`"),
             ({"retrieval": {"fusion": {"depth": 2000}}}, "retrieval.fusion.depth (2000) exceeds limits.max_depth "
                                                          "(1000). Fix: lower retrieval.fusion.depth or raise")]
    for extra, message in cases:
        with pytest.raises(ConfigError) as e:
            validate(ServeJobConfig, {**base, **extra}, "t")
        assert message in str(e.value), (extra, str(e.value))
    assert validate(ServeJobConfig, {**base, "retrieval": {"fusion": {"depth": 2000}},
                                     "limits": {"max_depth": 2000}}, "t").retrieval.fusion.depth == 2000


def test_search_and_chat_requests_take_a_mode_and_fusion_overrides_within_limits():
    from pydantic import ValidationError

    from serving.schemas import FusionOptions

    r = SearchRequest.model_validate({"query": "q", "mode": "hybrid", "fusion": {"method": "rrf", "rrf_k": 20}})
    assert r.mode == "hybrid" and r.fusion.overrides() == {"method": "rrf", "rrf_k": 20}
    assert SearchRequest(query="q").mode is None and FusionOptions().overrides() == {}
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                 "retrieval": {"mode": "lexical", "fusion": {"weight": 0.2}}})
    assert chat.retrieval_options().mode == "lexical" and chat.retrieval_options().fusion.weight == 0.2
    for body in ({"mode": "bm25"}, {"fusion": {"weight": 1.2}}, {"fusion": {"weight": float("nan")}},
                 {"fusion": {"rrf_k": 0}}, {"fusion": {"rrf_k": float("inf")}}, {"fusion": {"depth": 0}},
                 {"fusion": {"method": "max"}}, {"fusion": {"wieght": 0.3}}, {"fusion": 3}):
        with pytest.raises(ValidationError):
            SearchRequest.model_validate({"query": "q", **body})
    limits = LimitsConfig(max_depth=200)
    check_search(SearchRequest.model_validate({"query": "q", "fusion": {"depth": 200}}), limits)
    with pytest.raises(InvalidRequest) as e:
        check_search(SearchRequest.model_validate({"query": "q", "fusion": {"depth": 201}}), limits)
    assert api_error(e.value).status == 400 and e.value.param == "fusion.depth"
    assert "limits.max_depth" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        check_chat(ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                         "retrieval": {"fusion": {"depth": 201}}}), limits)
    assert e.value.param == "retrieval.fusion.depth"


class _Handle:
    """A Serve deployment handle stand-in: ``handle.method.remote(*args)`` awaits the method of an object."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        method = getattr(self.obj, name)

        class _Remote:
            @staticmethod
            async def remote(*args):
                return method(*args)
        return _Remote


class _Group:
    def __init__(self, path):
        from sharding.search import ShardedIndex

        self.index = ShardedIndex.open(path)

    def rank(self, version, xq, texts, depth, rankings):
        from serving.rag import group_rankings

        return group_rankings(self.index, xq, texts, depth, rankings)


def test_retriever_reads_the_docstore_off_the_event_loop(texts_index, monkeypatch):
    """The Serve Retriever (its class, with handle stand-ins): passages equal one search of the whole index, and
    every docstore open and lookup runs in its docstore thread, never on the event loop's."""
    import asyncio
    import threading

    import serving.deployments as dep
    from configs.schema.serve import IndexSource, RetrievalConfig
    from sharding.search import ShardedIndex, search

    threads = []
    real = dep.passages_from

    def spy(*args, **kw):
        threads.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(dep, "passages_from", spy)
    r = dep.Retriever.func_or_class(_Handle(object()), [_Handle(_Group(texts_index["path"]))],
                                    IndexSource(path=texts_index["path"]), RetrievalConfig(mode="lexical"))
    query = texts_index["queries"][0]

    async def ask():
        return await r.search(query, 4), threading.current_thread().name

    result, loop_thread = asyncio.run(ask())
    D, I = search(ShardedIndex.open(texts_index["path"]), None, [query], 4, "lexical")
    assert [p.chunk_id for p in result.passages] == [c for c in I[0].tolist() if c >= 0]
    assert threads and all(t.startswith("docstore") and t != loop_thread for t in threads)
