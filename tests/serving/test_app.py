"""The serving app on a real local Ray Serve: an index of SQuAD paragraphs built by the real embed and index jobs,
the tiny generator with a LoRA adapter, the `openai` client against the HTTP API.

One app for the whole module (Serve starts in ~15 s and stops in ~8 s), in the split layout, and the same config in
the fused layout beside it (the `fused` fixture, at /fused), which must answer alike, and for one test the fused
layout with the index apart (the `apart` fixture, at /apart: IndexReplica replicas behind one Ingress). The tests
that disturb them (a replica killed, an index version swapped, documents added and deleted) come last. Answers of
the tiny model are gibberish: the tests check the API contract (shapes, streaming, citations, errors, auth) and that
retrieval returns exactly what `ragtune search` returns, under load and through failures.
"""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789abcdef"
N_V1, N_V2 = 120, 150  # paragraphs in index version 1; version 2 adds 30 more
QUERIES = ["Which NFL team won Super Bowl 50?", "Where did Super Bowl 50 take place?",
           "What is the Amazon rainforest?", "Who was the Normans' leader?", "What color was used to emphasize "
                                                                             "the 50th anniversary?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_version(rows, work, root):
    from jobs.embed import run as embed
    from jobs.index import run as index

    path = work / f"corpus-{len(rows)}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = work / f"emb-{len(rows)}"
    embed(EmbedJobConfig.model_validate({"corpus": {"path": str(path), "id_field": "_id"},
                                         "chunk": {"size": None}, "output": {"path": str(emb), "num_parts": 2}}))
    return index(IndexJobConfig.model_validate({"embeddings": {"path": str(emb)},
                                                "index": {"path": str(root), "kind": "Flat", "shards": 2}}))


@pytest.fixture(scope="module")
def served(ray_2_cpus, squad_retrieval, tmp_path_factory):
    """(base URL, config, index root, v2 probe). LATEST is v-00001; v-00002 is built and waits to be switched to."""
    from peft import LoraConfig, get_peft_model
    from ray import serve

    from models.generators import TinySpec, build_tiny, load_model
    from serving.app import ServeAppArgs, build_app
    from sharding.manifest import switch_latest
    from sharding.storage import resolve

    work = tmp_path_factory.mktemp("serve")
    with open(squad_retrieval / "corpus.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(N_V2)]
    root = work / "index"
    assert build_version(rows[:N_V1], work, root).version == "v-00001"
    assert build_version(rows, work, root).version == "v-00002"
    switch_latest(resolve(str(root)), "v-00001")  # serve v1; the swap test switches to v2

    import torch

    # the tiny preset with a tokenizer trained on these paragraphs and a 2048-token context, so that k = 3
    # passages fit a prompt (the session's tiny model reads SQuAD text at ~2 characters per token)
    tiny_model_dir = str(build_tiny(work / "tiny", [r["text"] for r in rows], TinySpec(context=2048)))
    torch.manual_seed(1)
    adapter = work / "adapter"
    get_peft_model(load_model(tiny_model_dir), LoraConfig(r=8, lora_alpha=64, init_lora_weights=False,
                                                          target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    port = free_port()
    cfg = ServeJobConfig.model_validate({
        "index": {"path": str(root), "poll_interval_s": None},
        # the split layout (auto would fuse an index this small); CPU reservations that leave room for the fused
        # app beside it (the `fused` fixture)
        "embedder": {"max_batch_size": 16, "num_cpus": 0.2},
        "shards": {"layout": "split", "groups": 2, "health_check_period_s": 1, "num_cpus": 0.2},
        "generator": {"model": tiny_model_dir, "name": "tiny", "adapters": {"lora": str(adapter)},
                      "defaults": {"max_tokens": 8}, "max_batch_size": 4, "num_cpus": 0.3},
        "retrieval": {"k": 3, "retries_s": 60},
        "http": {"port": port},
        "auth": {"api_keys": [KEY], "api_keys_env": None},
        "limits": {"max_tokens": 64, "max_k": 20, "max_body_bytes": 20_000, "max_messages": 8,
                   "max_input_chars": 8000, "request_timeout_s": 90},
    })
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="ragtune", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    probe = rows[-1]["text"].split(". ")[0]  # a sentence of a paragraph only version 2 holds
    yield url, cfg, root, probe, rows
    serve.shutdown()


@pytest.fixture(scope="module")
def fused(served):
    """The same config in the fused layout, a second app beside the split one: its base URL (/fused). Two Ingress
    replicas, each holding the index (the reload test: they switch versions in step); each answers at most 4
    requests at once (the overload test)."""
    from ray import serve

    from serving.app import ServeAppArgs, build_app

    url, cfg, *_ = served
    fused_cfg = cfg.model_copy(update={"shards": cfg.shards.model_copy(update={"layout": "fused", "replicas": 2,
                                                                                "fused_in_ingress": True}),
                                       "generator": cfg.generator.model_copy(update={"num_cpus": 0.1}),
                                       "limits": cfg.limits.model_copy(update={"max_concurrent_requests": 4})})
    serve.run(build_app(ServeAppArgs(config=fused_cfg.model_dump(mode="json"))), name="ragtune-fused",
              route_prefix="/fused")
    yield f"{url}/fused"
    serve.delete("ragtune-fused")


@pytest.fixture
def apart(served):
    """The same config fused with the index apart (``shards.fused_in_ingress: false``), a fourth app (/apart): two
    IndexReplica replicas behind one Ingress, reserving little enough CPU to fit beside the others. (base URL,
    plan)."""
    from ray import serve

    from serving.app import ServeAppArgs, build_app, plan_for

    url, cfg, *_ = served
    apart_cfg = cfg.model_copy(update={
        "shards": cfg.shards.model_copy(update={"layout": "fused", "fused_in_ingress": False, "replicas": 2,
                                                "num_cpus": 0.02}),
        "generator": cfg.generator.model_copy(update={"num_cpus": 0.02})})
    plan = plan_for(apart_cfg)
    serve.run(build_app(ServeAppArgs(config=apart_cfg.model_dump(mode="json"))), name="ragtune-apart",
              route_prefix="/apart")
    yield f"{url}/apart", plan
    serve.delete("ragtune-apart")


STRICT_TIMEOUT_S = 2  # the `strict` app's limits.request_timeout_s
LONG = 2000  # max_tokens of a generation that runs well past it (the tiny model's context is 2048)


@pytest.fixture(scope="module")
def strict(served, tmp_path_factory):
    """A third app beside the split one (/strict): its own Ingress with a 2 s request timeout and room for long
    generations, and its own Generator holding at most 1 adapter of 2 (each eviction unloads one), over the split
    app's Retriever and Embedder. (base URL, the Generator's handle) for the timeout, disconnect and eviction
    tests."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import serve

    from cluster.placement import ReplicaResources
    from models.generators import load_model
    from serving.auth import api_key_hashes
    from serving.deployments import Generator
    from serving.ingress import Ingress

    _, cfg, *_ = served
    torch.manual_seed(2)
    lora2 = tmp_path_factory.mktemp("strict") / "adapter2"
    lora = LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    get_peft_model(load_model(cfg.generator.model), lora).save_pretrained(lora2)
    g = cfg.generator.model_copy(update={"adapters": {**cfg.generator.adapters, "lora2": str(lora2)},
                                         "max_adapters_per_replica": 1})
    limits = cfg.limits.model_copy(update={"request_timeout_s": STRICT_TIMEOUT_S, "max_tokens": LONG})
    generator = Generator.options(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32).bind(
        g, cfg.prompt, ReplicaResources(num_cpus=0.1, num_gpus=0, threads=1, device="cpu"))
    others = [serve.get_deployment_handle(name, app_name="ragtune") for name in ("Embedder", "Retriever")]
    serve.run(Ingress.options(ray_actor_options={"num_cpus": 0.05}).bind(
        *others, generator, generation=g, retrieval=cfg.retrieval, limits=limits,
        key_hashes=sorted(api_key_hashes([KEY], None)), api_keys_env=None), name="ragtune-strict",
        route_prefix="/strict")
    yield f"{served[0]}/strict", serve.get_deployment_handle("Generator", app_name="ragtune-strict")
    serve.delete("ragtune-strict")


def post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kw)


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(served):
    """What `ragtune search` answers for each version, in this process: {version: {query: [chunk ids]}}."""
    from serving.rag import LocalRetriever

    _, _, root, probe, _ = served
    out = {}
    for v in ("v-00001", "v-00002"):
        r = LocalRetriever(str(root / v))
        out[v] = {q: [h.chunk_id for h in r.search(q, 5)] for q in [*QUERIES, probe]}
    return out


def search_ids(url, query, k=5):
    r = post(url, "/v1/search", {"query": query, "k": k})
    assert r.status_code == 200, r.text
    body = r.json()
    return [h["chunk_id"] for h in body["data"]], body["version"]


# --- the OpenAI API ---------------------------------------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_openai_client_chat_plain_and_streamed_with_citations(served, client):
    url, cfg, *_ = served
    assert requests.get(f"{url}/healthz", timeout=30).json()["ready"]
    msgs = [{"role": "user", "content": "Which NFL team won Super Bowl 50?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6)
    assert r.object == "chat.completion" and r.model == "tiny" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert isinstance(text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 50
    cites = r.model_extra["citations"]
    assert [c["n"] for c in cites] == [1, 2, 3] and cites[0]["title"] == "Super Bowl 50"
    assert all({"chunk_id", "doc_id", "score", "text"} <= set(c) for c in cites)

    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["citations"] == cites
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same decode loop, streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices

    off = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, extra_body={"retrieval": False})
    assert off.model_extra["citations"] == [] and off.usage.prompt_tokens < 30
    lora = client.chat.completions.create(model="lora", messages=msgs, max_tokens=6, extra_body={"retrieval": False})
    assert lora.model == "lora" and lora.choices[0].message.content != off.choices[0].message.content
    filtered = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body={
        "retrieval": {"k": 2, "filter": {"title": "Normans"}}})
    assert [c["title"] for c in filtered.model_extra["citations"]] == ["Normans", "Normans"]

    comp = client.completions.create(model="tiny", prompt="Super Bowl 50 was", max_tokens=5)
    assert comp.object == "text_completion" and comp.usage.completion_tokens <= 5
    assert isinstance(comp.choices[0].text, str)


@pytest.mark.timeout(300)
def test_completions_streamed_equal_the_plain_answer(client):
    """/v1/completions with stream: text_completion chunks whose text is the plain (greedy) answer's, its finish
    reason last, then the usage chunk; an adapter streams its own answer."""
    plain = client.completions.create(model="tiny", prompt="Super Bowl 50 was", max_tokens=8)
    chunks = list(client.completions.create(model="tiny", prompt="Super Bowl 50 was", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.model == "tiny" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    with_text = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_text) == plain.choices[0].text and len(with_text) > 1
    assert with_text[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_text[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    lora = client.completions.create(model="lora", prompt="Super Bowl 50 was", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in lora if c.choices) != plain.choices[0].text


@pytest.mark.timeout(300)
def test_embeddings_and_models(served, client):
    from models.embedders import QueryEncoder
    from sharding.manifest import read_index_manifest, resolve_index

    _, _, root, *_ = served
    models = {m.id for m in client.models.list().data}
    assert models == {"tiny", "lora", "all-MiniLM-L6-v2"}
    texts = ["Which NFL team won Super Bowl 50?", "a second, different input"]
    out = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in out.data], dtype=np.float32)
    want = QueryEncoder(read_index_manifest(resolve_index(str(root)))).encode(texts)
    assert got.shape == (2, 384) and np.allclose(got, want, atol=1e-5)
    assert out.usage.prompt_tokens > 10
    plain = post(served[0], "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": texts[0],
                                               "encoding_format": "float"}).json()
    assert np.allclose(plain["data"][0]["embedding"], want[0], atol=1e-5)


@pytest.mark.timeout(300)
def test_search_equals_ragtune_search(served, capsys):
    from jobs.cli import main

    url, _, root, *_ = served
    assert main(["search", "-i", str(root), *QUERIES, "-k", "5", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for item in cli:
        r = post(url, "/v1/search", {"query": item["query"], "k": 5, "mode": "dense"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == "v-00001"  # by name: the server's paths stay on the server
        assert [(h["rank"], h["chunk_id"], h["doc_id"], h["title"], h["text"]) for h in body["data"]] == \
            [(h["rank"], h["chunk_id"], h["doc_id"], h["title"], h["text"]) for h in item["results"]]
        assert np.allclose([h["score"] for h in body["data"]], [h["score"] for h in item["results"]], atol=1e-4)
    only = post(url, "/v1/search", {"query": QUERIES[0], "k": 3, "filter": {"doc_id": cli[2]["results"][0]["doc_id"]}})
    assert {h["doc_id"] for h in only.json()["data"]} == {cli[2]["results"][0]["doc_id"]}


def search_body(url, query, **fields):
    r = post(url, "/v1/search", {"query": query, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def hits(body_or_results):
    data = body_or_results["data"] if isinstance(body_or_results, dict) else body_or_results
    return [(h["rank"], h["chunk_id"], h["doc_id"], h["title"], h["text"]) for h in data]


FUSION_CASES = [  # (mode, `ragtune search` flags, the same as a request's fusion)
    ("dense", [], None), ("lexical", [], None), ("hybrid", [], None),
    ("hybrid", ["--weight", "0.3", "--depth", "20"], {"weight": 0.3, "depth": 20}),
    ("hybrid", ["--fusion", "rrf", "--rrf-k", "10"], {"method": "rrf", "rrf_k": 10}),
]


@pytest.mark.timeout(300)
def test_search_modes_equal_ragtune_search_across_two_shard_groups(served, capsys):
    """Lexical and hybrid through 2 shard groups (each ranking merged across groups, then fused) are exactly
    `ragtune search --mode ...` over the whole index; filters work in every mode, as in one process."""
    from jobs.cli import main
    from serving.rag import LocalRetriever

    url, cfg, root, *_ = served
    assert cfg.shards.groups == 2 and cfg.retrieval.mode == "auto"
    cli = {}
    for mode, flags, fusion in FUSION_CASES:
        assert main(["search", "-i", str(root), *QUERIES, "-k", "5", "--json", "--mode", mode, *flags]) == 0
        cli[mode, fusion is None] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for item in cli[mode, fusion is None]:
            body = search_body(url, item["query"], k=5, mode=mode, **({"fusion": fusion} if fusion else {}))
            assert body["mode"] == mode and hits(body) == hits(item["results"]), (mode, fusion, item["query"])
            assert np.allclose([h["score"] for h in body["data"]], [h["score"] for h in item["results"]], atol=1e-4)
    dense, lexical, hybrid = (cli[m, True] for m in ("dense", "lexical", "hybrid"))
    assert any(hits(h["results"]) != hits(d["results"]) for h, d in zip(hybrid, dense, strict=True))
    assert any(hits(h["results"]) != hits(x["results"]) for h, x in zip(hybrid, lexical, strict=True))
    for item in hybrid:  # retrieval.mode auto on an index with a lexical part: hybrid
        body = search_body(url, item["query"], k=5)
        assert body["mode"] == "hybrid" and hits(body) == hits(item["results"])

    local = LocalRetriever(str(root / "v-00001"))  # the in-process path (ragtune ask --config, compare)
    for mode, _, fusion in FUSION_CASES:
        for flt in ({"title": "Normans"}, {"title": ["Amazon rainforest", "Super Bowl 50"]}):
            answered = []
            for q in QUERIES[:4]:
                body = search_body(url, q, k=4, mode=mode, filter=flt, **({"fusion": fusion} if fusion else {}))
                want = [p.model_dump() for p in local.search(q, 4, flt, mode=mode, fusion=fusion)]
                assert hits(body) == hits(want), (mode, flt, q)
                assert body["data"] or mode == "lexical"  # BM25 finds no Normans chunk sharing a term with some
                titles = flt["title"] if isinstance(flt["title"], list) else [flt["title"]]
                assert {h["title"] for h in body["data"]} <= set(titles)
                assert np.allclose([h["score"] for h in body["data"]], [h["score"] for h in want], atol=1e-4)
                answered += [q] if body["data"] else []
            # lexical too answers the queries that share terms with the filtered chunks: never empty for all
            assert (QUERIES[3] if flt["title"] == "Normans" else QUERIES[0]) in answered, (mode, flt, answered)

    metrics = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    for mode in ("dense", "lexical", "hybrid"):
        assert f'ragtune_search_seconds_count{{mode="{mode}"}}' in metrics


@pytest.mark.timeout(300)
def test_chat_cites_the_passages_of_the_mode_it_asks_for(served, client):
    from models.embedders import QueryEncoder
    from sharding.search import ShardedIndex, search

    _, _, root, *_ = served
    index = ShardedIndex.open(str(root))
    xq = QueryEncoder(index.manifest).encode(QUERIES)
    ref = {m: search(index, xq, QUERIES, 3, m)[1] for m in ("dense", "lexical", "hybrid")}
    differs = [q for q in range(len(QUERIES)) if ref["hybrid"][q].tolist() != ref["dense"][q].tolist()]
    assert differs  # a query whose hybrid passages are not the dense ones
    for q in differs[:2]:
        msgs = [{"role": "user", "content": QUERIES[q]}]
        for mode in ("hybrid", "lexical", None):
            extra = {"retrieval": {"k": 3, **({"mode": mode} if mode else {})}}
            r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, extra_body=extra)
            cites = r.model_extra["citations"]
            assert [c["chunk_id"] for c in cites] == ref[mode or "hybrid"][q].tolist(), (mode, QUERIES[q])
            assert [c["n"] for c in cites] == [1, 2, 3]


# --- the fused layout: the same answers in one hop --------------------------------------------------------------------

@pytest.mark.timeout(600)
def test_fused_and_split_layouts_answer_alike(served, fused):
    """The same index and config in both layouts: identical /v1/search results in every mode, with fusion
    overrides and filters, identical embeddings and identical greedy chat answers and citations; the plan picks
    fused for this index by itself (auto) and a search then crosses one deployment."""
    from cluster.placement import NodeResources
    from serving.app import plan_for, route_hops

    url, cfg, *_ = served
    assert requests.get(f"{fused}/healthz", timeout=60).json()["ready"]
    auto = cfg.model_copy(update={"shards": cfg.shards.model_copy(update={"layout": "auto"})})
    plan = plan_for(auto, [NodeResources(cpus=2, memory=8 * 2**30)])
    assert plan.layout == "fused", plan.reason
    assert route_hops(plan)["/v1/search"] == "proxy -> Ingress (embed + 2 shard(s) + docstore, in process)"
    for mode, _, fusion in FUSION_CASES:
        for flt in (None, {"title": ["Amazon rainforest", "Super Bowl 50"]}):
            for q in QUERIES:
                body = {"query": q, "k": 5, "mode": mode, **({"fusion": fusion} if fusion else {}),
                        **({"filter": flt} if flt else {})}
                split_body, fused_body = search_body(url, **body), search_body(fused, **body)
                assert hits(fused_body) == hits(split_body), (mode, fusion, flt, q)
                assert fused_body["mode"] == split_body["mode"] and fused_body["version"] == split_body["version"]
                assert np.allclose([h["score"] for h in fused_body["data"]],
                                   [h["score"] for h in split_body["data"]], atol=1e-4)
    embed = {"model": "all-MiniLM-L6-v2", "input": QUERIES[:3], "encoding_format": "float"}
    split_vectors, fused_vectors = (np.array([d["embedding"] for d in post(u, "/v1/embeddings", embed).json()["data"]])
                                    for u in (url, fused))
    assert split_vectors.shape == (3, 384) and np.allclose(split_vectors, fused_vectors, atol=1e-5)
    for q in QUERIES[:2]:  # greedy, one at a time: the same passages give the same prompt and answer
        chat = {"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0}
        split_chat, fused_chat = post(url, "/v1/chat/completions", chat).json(), \
            post(fused, "/v1/chat/completions", chat).json()
        assert fused_chat["citations"] == split_chat["citations"] and len(fused_chat["citations"]) == 3
        assert fused_chat["choices"][0]["message"]["content"] == split_chat["choices"][0]["message"]["content"]
    metrics = requests.get(f"{fused}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    assert 'ragtune_batch_size_count{deployment="embedder"}' in metrics and 'mode="hybrid"' in metrics
    assert_openai_error(post(fused, "/v1/search", {"query": "q", "mode": "sparse"}), 400, param="mode")


# --- auth and bad input -----------------------------------------------------------------------------------------------

def assert_openai_error(r, status, code=None, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err


@pytest.mark.timeout(300)
def test_requests_without_a_valid_key_are_401(served):
    import openai

    url = served[0]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "q"}]}
    assert_openai_error(post(url, "/v1/chat/completions", chat, key=None), 401, "invalid_api_key")
    assert_openai_error(post(url, "/v1/chat/completions", chat, key="wrong-key-0123456789"), 401, "invalid_api_key")
    assert_openai_error(post(url, "/v1/search", {"query": "q"}, key=None), 401)
    for path, body in (("/admin/reload", {}), ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": "q"}),
                       ("/v1/completions", {"model": "tiny", "prompt": "q", "max_tokens": 2}),
                       ("/v1/completions", {"model": "tiny", "prompt": "q", "max_tokens": 2, "stream": True})):
        assert_openai_error(post(url, path, body, key=None), 401, "invalid_api_key")
        assert_openai_error(post(url, path, body, key="wrong-key-0123456789"), 401, "invalid_api_key")
    assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{url}/metrics", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope-nope-nope-nope", max_retries=0).models.list()
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # probes need no key


@pytest.mark.timeout(300)
def test_bad_input_is_a_4xx_in_openai_format_never_a_500(served):
    url = served[0]
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    assert_openai_error(requests.post(f"{url}/v1/chat/completions", data=b"{not json", headers=h, timeout=60), 400,
                        "invalid_json")
    assert_openai_error(requests.post(f"{url}/v1/chat/completions", data=b"[1, 2]", headers=h, timeout=60), 400,
                        "invalid_json")
    assert_openai_error(requests.post(f"{url}/v1/chat/completions", data=b"\xff\xfe", headers=h, timeout=60), 400)
    nan = b'{"query": "q", "mode": "hybrid", "fusion": {"weight": NaN}}'  # Python's json reads NaN: refused
    assert_openai_error(requests.post(f"{url}/v1/search", data=nan, headers=h, timeout=60), 400,
                        param="fusion.weight")
    cases = [
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "max_tokens": 65}, 400, "max_tokens"),
        ("/v1/chat/completions", {**ok, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {**ok, "n": 3}, 400, None),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": "q"}] * 9}, 400, "messages"),
        ("/v1/chat/completions", {**ok, "retrieval": {"k": 21}}, 400, "retrieval.k"),
        ("/v1/chat/completions", {**ok, "model": "gpt-4"}, 404, "model"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": "Zal " * 1900}], "max_tokens": 64},
         400, "messages"),  # within max_input_chars, beyond the tiny model's 2048-token context
        ("/v1/chat/completions", {**ok, "stream": True, "model": "nope"}, 404, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, None),
        ("/v1/completions", {"model": "tiny", "prompt": "Zal " * 1900, "max_tokens": 8}, 400, "prompt"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": [[1, 2, 3]]}, 400, None),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
        ("/v1/search", {"query": "q", "k": 0}, 400, "k"),
        ("/v1/search", {"query": "q", "k": 21}, 400, "k"),
        ("/v1/search", {"query": ""}, 400, "query"),
        ("/v1/search", {"query": "q", "filter": {"a": {"nested": 1}}}, 400, None),
        ("/v1/search", {"query": "q", "mode": "sparse"}, 400, "mode"),
        ("/v1/search", {"query": "q", "mode": 3}, 400, "mode"),
        ("/v1/search", {"query": "q", "mode": "hybrid", "fusion": {"weight": 1.5}}, 400, "fusion.weight"),
        ("/v1/search", {"query": "q", "fusion": {"method": "max"}}, 400, "fusion.method"),
        ("/v1/search", {"query": "q", "fusion": {"rrf_k": -1}}, 400, "fusion.rrf_k"),
        ("/v1/search", {"query": "q", "fusion": {"depth": 0}}, 400, "fusion.depth"),
        ("/v1/search", {"query": "q", "fusion": {"depth": 1001}}, 400, "fusion.depth"),  # over limits.max_depth
        ("/v1/search", {"query": "q", "fusion": {"wieght": 0.3}}, 400, "fusion.wieght"),
        ("/v1/search", {"query": "q", "fusion": "rrf"}, 400, "fusion"),
        ("/v1/chat/completions", {**ok, "retrieval": {"mode": "bm25"}}, 400, "retrieval.mode"),
        ("/v1/chat/completions", {**ok, "retrieval": {"fusion": {"depth": 5000}}}, 400, "retrieval.fusion.depth"),
    ]
    for path, body, status, param in cases:
        assert_openai_error(post(url, path, body), status, param=param)
    big = post(url, "/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert_openai_error(big, 413, "request_too_large")
    chunked = requests.post(f"{url}/v1/search", data=iter([b'{"query": "', b"x" * 25_000, b'"}']), headers=h,
                            timeout=60)  # no Content-Length: counted while read
    assert_openai_error(chunked, 413, "request_too_large")
    assert_openai_error(requests.get(f"{url}/v1/nothing", headers=h, timeout=60), 404)
    for path in ("/v1/search", "/v1/chat/completions", "/v1/embeddings", "/v1/completions"):  # hostile nesting
        for deep in (b"[" * 5000, b'{"a":' * 3000, b'{"query": "q", "filter": ' + b"[" * 40 + b"]" * 40 + b"}"):
            assert_openai_error(requests.post(f"{url}{path}", data=deep, headers=h, timeout=60), 400, "invalid_json")
    assert_openai_error(post(url, "/v1/chat/completions", {**ok, "response_format": {"type": "json_object"}}), 400,
                        param="response_format")  # refused, not silently answered with free text
    assert post(url, "/v1/chat/completions", {**ok, "response_format": {"type": "text"}}).status_code == 200
    metrics = requests.get(f"{url}/metrics", headers=h, timeout=60).text
    assert 'ragtune_requests_total{route="search",status="400"}' in metrics
    assert 'ragtune_stage_seconds_count{stage="embed"}' in metrics and 'stage="generate"' in metrics
    assert 'ragtune_batch_size_count{deployment="embedder"}' in metrics
    assert 'status="500"' not in metrics


# --- timeouts, clients that go away, adapter eviction (the `strict` app) --------------------------------------------

LONG_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about Super Bowl 50."}],
             "max_tokens": LONG, "retrieval": False}
LONG_COMPLETION = {"model": "tiny", "prompt": "Super Bowl 50 was", "max_tokens": LONG}


def scrape(url):
    return requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text


def metric(text, name):
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def idle_after(generator, within_s):
    """Seconds until the Generator's engine has no request decoding or waiting; None if not within ``within_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        info = generator.engine_info.remote().result(timeout_s=30)
        if info.running == 0 and info.waiting == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def open_stream(url, path, body):
    """A streamed request on a connection of its own (closed by the caller): (connection, response)."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", f"{u.path}{path}", json.dumps({**body, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_events(resp, n):
    """The next ``n`` SSE data payloads of a streamed response."""
    out = []
    while len(out) < n:
        line = resp.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: "):
            out.append(line[6:].strip().decode())
    return out


@pytest.mark.timeout(300)
def test_a_request_past_the_timeout_gets_a_504_and_frees_its_generation_slot(strict):
    """limits.request_timeout_s cuts a generation that would run on for much longer: a 504 in OpenAI's format (in
    the stream, an error event then [DONE]), and the request's generation slot is freed at once, well before its
    2000 tokens would have been decoded; a request after it is answered at once."""
    url, generator = strict
    tokens_before = metric(scrape(url), 'ragtune_tokens_total{kind="completion"}')
    t0 = time.monotonic()
    r = post(url, "/v1/chat/completions", {**LONG_CHAT, "stream": True})
    elapsed = time.monotonic() - t0
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]", r.text[-300:]
    err = json.loads(events[-2])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "timeout" and err["type"] == "timeout"
    assert "limits.request_timeout_s" in err["message"]
    assert STRICT_TIMEOUT_S <= elapsed < STRICT_TIMEOUT_S + 5
    decoded = metric(scrape(url), 'ragtune_tokens_total{kind="completion"}') - tokens_before
    assert 0 < decoded < LONG, decoded  # cut, not finished
    whole_s = LONG * elapsed / decoded  # what the whole generation takes at the rate measured
    assert (idle := idle_after(generator, whole_s)) is not None and elapsed + idle < 0.6 * whole_s, \
        (idle, whole_s, generator.engine_info.remote().result())

    for path, body in (("/v1/chat/completions", LONG_CHAT), ("/v1/completions", LONG_COMPLETION)):
        t0 = time.monotonic()
        r = post(url, path, body)
        assert_openai_error(r, 504, "timeout")
        assert r.json()["error"]["type"] == "timeout" and "limits.request_timeout_s" in r.json()["error"]["message"]
        elapsed = time.monotonic() - t0
        assert STRICT_TIMEOUT_S <= elapsed < STRICT_TIMEOUT_S + 5
        assert (idle := idle_after(generator, whole_s)) is not None and elapsed + idle < 0.6 * whole_s, \
            (path, idle, whole_s, generator.engine_info.remote().result())
    metrics = scrape(url)
    assert metric(metrics, "ragtune_requests_in_flight") == 0
    for route in ("chat", "completions"):
        assert metric(metrics, f'ragtune_requests_total{{route="{route}",status="504"}}') == 1, route
    t0 = time.monotonic()
    assert post(url, "/v1/chat/completions", {**LONG_CHAT, "max_tokens": 2}).status_code == 200
    assert time.monotonic() - t0 < 0.5 * whole_s  # its slot was free: not queued behind an abandoned generation


@pytest.mark.timeout(300)
def test_a_client_that_closes_a_stream_midway_frees_its_slot(strict):
    """A client reads a few events of a long streamed chat (then a completion) and closes the connection: the
    generation is cancelled at once, the Ingress's in-flight gauge is back to 0, and the metrics count the stream
    as closed by its client (499; the request timeout would have counted a 504)."""
    url, generator = strict
    for route, path, body in (("chat.stream", "/v1/chat/completions", LONG_CHAT),
                              ("completion.stream", "/v1/completions", LONG_COMPLETION)):
        before = scrape(url)
        conn, resp = open_stream(url, path, body)
        assert resp.status == 200
        read_events(resp, 4)
        assert generator.engine_info.remote().result(timeout_s=30).running == 1  # decoding it now
        assert metric(scrape(url), "ragtune_requests_in_flight") == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert idle_after(generator, 5) is not None, (route, generator.engine_info.remote().result())
        time.sleep(0.3)  # the stream's response ends just after the cancel
        after = scrape(url)
        assert metric(after, "ragtune_requests_in_flight") == 0, route
        for status, more in (("499", 1), ("504", 0)):
            name = f'ragtune_requests_total{{route="{route}",status="{status}"}}'
            assert metric(after, name) == metric(before, name) + more, (route, status)
        decoded = (metric(after, 'ragtune_tokens_total{kind="completion"}')
                   - metric(before, 'ragtune_tokens_total{kind="completion"}'))
        assert 4 <= decoded < LONG / 2, decoded  # stopped early, not decoded to the end


@pytest.mark.timeout(300)
def test_adapter_eviction_when_a_replica_holds_its_maximum(strict):
    """A Generator that holds at most 1 adapter of 2: asking for the other evicts the first (unloaded from the
    engine), and asking for the first again answers as before. Evicted while a stream decodes with it, an adapter
    stays until that stream ends, which answers as it would have unevicted (through the Generator's handle: the
    stream runs longer than the strict app's request timeout)."""
    from serving.generation import SamplingParams
    from serving.schemas import CompletionInput, Step

    url, generator = strict
    msgs = [{"role": "user", "content": "Which NFL team won Super Bowl 50?"}]

    def ask(model, max_tokens=8):
        r = post(url, "/v1/chat/completions", {"model": model, "messages": msgs, "max_tokens": max_tokens,
                                               "retrieval": False})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def loaded():
        return sorted(generator.engine_info.remote().result(timeout_s=30).adapters)

    first = ask("lora")
    assert loaded() == ["lora"]
    other = ask("lora2")
    assert loaded() == ["lora2"] and other != first  # evicted, and each answers with its own weights
    assert ask("lora") == first and loaded() == ["lora"]

    request = CompletionInput(prompt="Super Bowl 50 was", params=SamplingParams(max_tokens=600))
    lora = generator.options(multiplexed_model_id="lora")
    want = lora.complete.remote(request).result(timeout_s=120)
    assert want.completion_tokens > 100
    stream = lora.options(stream=True).stream.remote(request)
    events = [next(stream), next(stream), next(stream)]
    short = CompletionInput(prompt="Super Bowl 50 was", params=SamplingParams(max_tokens=4))
    generator.options(multiplexed_model_id="lora2").complete.remote(short).result(timeout_s=120)  # evicts lora
    info = generator.engine_info.remote().result(timeout_s=30)
    assert info.running == 1 and sorted(info.adapters) == ["lora", "lora2"]  # kept while the stream decodes
    events += list(stream)
    assert "".join(e.text for e in events if isinstance(e, Step)) == want.text  # its own adapter to the end
    deadline = time.monotonic() + 5
    while loaded() != ["lora2"] and time.monotonic() < deadline:  # unloaded once its last request ended
        time.sleep(0.05)
    assert loaded() == ["lora2"]


# --- the commands: ragtune ask, ragtune serve's preflight and Serve config --------------------------------------------

def write_config(cfg, path, **changes):
    import yaml

    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.timeout(300)
def test_ragtune_ask_over_http_streamed_and_in_process(served, capsys, tmp_path):
    from jobs.cli import main

    url, cfg, root, *_ = served
    q = "Which NFL team won Super Bowl 50?"
    assert main(["ask", q, "--url", url, "--api-key", KEY, "--json", "--max-tokens", "4"]) == 0
    http = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(http["text"], str) and http["finish_reason"] in ("stop", "length")
    want = [h["chunk_id"] for h in post(url, "/v1/search", {"query": q, "k": 3}).json()["data"]]
    assert [c["chunk_id"] for c in http["citations"]] == want

    assert main(["ask", q, "--url", url, "--api-key", KEY, "--stream", "--max-tokens", "4", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "passages:" in out and "[1]" in out and "[2]" in out and "[3]" not in out

    path = write_config(cfg, tmp_path / "serve.yaml")  # in this process: no server, the same functions
    assert main(["ask", q, "--config", path, "--json", "--max-tokens", "4"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["chunk_id"] for c in local["citations"]] == want
    assert local["usage"]["completion_tokens"] <= 4 and local["usage"]["prompt_tokens"] > 100

    lexical = [h["chunk_id"] for h in post(url, "/v1/search", {"query": q, "k": 3, "mode": "lexical"}).json()["data"]]
    assert lexical != want  # the mode changes the passages (auto is hybrid here)
    assert main(["ask", q, "--url", url, "--api-key", KEY, "--json", "--max-tokens", "2", "--mode", "lexical"]) == 0
    assert [c["chunk_id"] for c in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["citations"]] == lexical
    assert main(["ask", q, "--config", path, "--json", "--max-tokens", "2", "--mode", "lexical"]) == 0
    assert [c["chunk_id"] for c in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["citations"]] == lexical

    assert main(["ask", q, "--url", url, "--api-key", "not-the-key-0123456789"]) == 2  # a clear error, exit 2
    assert "HTTP 401" in capsys.readouterr().err
    assert main(["ask", q, "--url", "http://127.0.0.1:9"]) == 2  # nothing listens there: a clear error, exit 2
    assert "cannot connect" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_serve_preflight_and_the_serve_config_for_a_rayservice(served, capsys, tmp_path, monkeypatch):
    import yaml

    from jobs.cli import main

    _, cfg, root, *_ = served
    good = write_config(cfg, tmp_path / "good.yaml")
    assert main(["validate", good, "--job", "serve"]) == 0
    capsys.readouterr()
    cases = {
        "missing adapter": ({"generator__adapters": {"lora": str(tmp_path / "nowhere")}},
                            "generator.adapters.lora"),
        "no model folder": ({"generator__model": str(tmp_path / "no-model")}, "generator.model"),
        "too many groups": ({"shards__groups": 3}, "shards.groups = 3 but"),
        "open without keys": ({"http__host": "0.0.0.0", "auth__api_keys": [], "auth__api_keys_env": "RT_TEST_KEYS"},
                              "http.host = '0.0.0.0' exposes the API"),
    }
    monkeypatch.delenv("RT_TEST_KEYS", raising=False)
    for name, (changes, message) in cases.items():
        path = write_config(cfg, tmp_path / f"{name.replace(' ', '-')}.yaml", **changes)
        assert main(["serve", "-c", path]) == 2, name  # refused before any Ray work
        assert message in capsys.readouterr().err, name

    assert main(["serve", "-c", good, "--print-serve-config"]) == 0
    text = capsys.readouterr().out
    assert KEY not in text  # keys never go into a Serve config
    doc = yaml.safe_load(text)
    [application] = doc["applications"]
    assert application["import_path"] == "serving.app:build_app"
    from serving.app import ServeAppArgs

    inline = ServeAppArgs.model_validate(application["args"]).resolve()
    assert inline.index.path == str(root) and inline.auth.api_keys == [] and not inline.serve.print_config
    assert doc["http_options"]["host"] == "127.0.0.1" and doc["http_options"]["port"] == cfg.http.port


# --- failures and updates under load ----------------------------------------------------------------------------------

def load(url, queries, stop, results, errors, concurrency=6):
    """Send /v1/search requests from `concurrency` threads until `stop` is set: (query, ids, version) or errors."""
    def worker(i):
        n = 0
        while not stop.is_set():
            q = queries[(i + n) % len(queries)]
            n += 1
            t0 = time.monotonic()
            try:
                r = post(url, "/v1/search", {"query": q, "k": 5})
                if r.status_code != 200:
                    errors.append((q, r.status_code, r.text[:200]))
                    continue
                body = r.json()
                results.append((q, [h["chunk_id"] for h in body["data"]], body["version"].rsplit("/", 1)[-1],
                                t0))  # when the request was sent
            except Exception as e:  # a connection error is a failed request too
                errors.append((q, type(e).__name__, str(e)[:200]))

    pool = ThreadPoolExecutor(concurrency)
    futures = [pool.submit(worker, i) for i in range(concurrency)]
    return pool, futures


def stop_load(stop, pool, futures):
    """Stop the load threads of :func:`load` and wait for them (their failures are in its ``errors``)."""
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_shard_searcher_replica_killed_under_traffic(served, reference):
    import ray
    from ray import serve

    url, *_ = served
    handle = serve.get_deployment_handle("ShardSearcher0", app_name="ragtune")
    victim = handle.whoami.remote().result(timeout_s=60)
    stop, results, errors = threading.Event(), [], []
    pool, futures = load(url, QUERIES, stop, results, errors)
    time.sleep(2)
    before = len(results)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    t_kill = time.monotonic()
    deadline = t_kill + 120
    replacement = None
    while time.monotonic() < deadline:  # wait for Serve to start a new replica
        try:
            replacement = handle.whoami.remote().result(timeout_s=10)
            if replacement != victim:
                break
        except Exception:
            pass
        time.sleep(0.5)
    time.sleep(3)  # traffic through the new replica
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()
    assert replacement and replacement != victim, "Serve did not replace the killed replica"
    assert not errors, errors[:5]
    after = [r for r in results if r[3] > t_kill]
    assert before > 0 and len(after) > 10, (before, len(after))
    wrong = [(q, ids) for q, ids, v, _ in results if ids != reference[v][q]]
    assert not wrong, wrong[:3]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_index_replica_killed_under_traffic_fails_no_request_when_the_fused_index_is_apart(apart, reference):
    """Fused with the index apart: the Ingress retries a search whose IndexReplica died mid-call on the other one,
    where an Ingress replica that holds the index takes its requests in flight with it (500s from Serve's proxy)."""
    import ray

    url, plan = apart
    assert plan.layout == "fused" and not plan.fused_in_ingress and "behind one Ingress" in plan.reason

    def replicas():
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if "ragtune-apart#IndexReplica#" in a["name"])

    for q in QUERIES[:3]:
        ids, version = search_ids(url, q)
        assert ids == reference[version][q]
    victims = replicas()
    assert len(victims) == 2, victims
    stop, results, errors = threading.Event(), [], []
    pool, futures = load(url, QUERIES, stop, results, errors)
    try:
        time.sleep(2)
        before = len(results)
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        t_kill = time.monotonic()
        deadline = t_kill + 120
        while time.monotonic() < deadline and (victims[0] in replicas() or len(replicas()) < 2):
            time.sleep(0.5)
        replaced = victims[0] not in replicas() and len(replicas()) == 2
        time.sleep(3)  # traffic through the new replica
    finally:
        stop_load(stop, pool, futures)
    assert replaced, "Serve did not replace the killed IndexReplica"
    assert not errors, errors[:5]
    after = [r for r in results if r[3] > t_kill]
    assert before > 0 and len(after) > 10, (before, len(after))
    wrong = [(q, ids) for q, ids, v, _ in results if ids != reference[v][q]]
    assert not wrong, wrong[:3]
    # every replica that computes, the replacement too, runs its OpenMP threads passive (serving.app.replica_env)
    deadline = time.monotonic() + 30  # the GCS's actor table may list the replacement a moment after Serve
    while True:
        computing = {n: pid for n, (dep, pid) in app_replicas("ragtune-apart").items() if dep != "VersionBoard"}
        if any(n not in victims for n in computing if "IndexReplica" in n) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {n.split("#")[1] for n in computing} == {"IndexReplica", "Generator", "Ingress"}, computing
    assert any(n not in victims for n in computing if "IndexReplica" in n), (computing, victims)
    for name, pid in computing.items():
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        assert env.get("OMP_WAIT_POLICY") == "PASSIVE", (name, env.get("OMP_WAIT_POLICY"))
    # once running (its constructor over), every thread of a replica that computes runs at limits.compute_nice
    # (10); the Ingress has threads at Ray's priority (this process's: the local Ray's processes inherit it)
    from ray import serve

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and serve.status().applications["ragtune-apart"].deployments[
            "IndexReplica"].replica_states != {"RUNNING": 2}:
        time.sleep(1)
    for name, pid in computing.items():
        nice = {int(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[16])
                for t in Path(f"/proc/{pid}/task").iterdir()}
        if "#Ingress#" in name:
            assert min(nice) == os.getpriority(os.PRIO_PROCESS, 0), (name, nice)
        else:
            assert min(nice) >= 10, (name, nice)


def test_lower_cpu_priority_sets_every_thread_and_those_started_after():
    """In a process of its own (nice cannot be lowered back without privileges): the threads started before the
    call and those a niced thread starts after it run at the nice given; 0 changes nothing."""
    code = textwrap.dedent("""
        import os, threading
        from serving.deployments import lower_cpu_priority

        def nice(tid):
            return int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])

        base = os.getpriority(os.PRIO_PROCESS, 0)
        stop = threading.Event()
        before = threading.Thread(target=stop.wait); before.start()
        assert lower_cpu_priority(0) == base and nice(before.native_id) == base
        assert lower_cpu_priority(base + 7) == base + 7
        after = threading.Thread(target=stop.wait); after.start()
        everyone = {nice(t) for t in os.listdir("/proc/self/task")}
        assert nice(before.native_id) == nice(after.native_id) == base + 7 and min(everyone) >= base + 7, everyone
        assert lower_cpu_priority(base + 5) == base + 7  # never back up (that needs privileges)
        stop.set()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def app_replicas(app: str) -> dict[str, tuple[str, int]]:
    """The alive replicas of Serve application ``app``: actor name -> (deployment, pid)."""
    import ray._private.state as state

    return {a["Name"]: (a["Name"].split("#")[1], int(a["Pid"])) for a in state.actors().values()
            if (a.get("Name") or "").startswith(f"SERVE_REPLICA::{app}#") and a["State"] == "ALIVE" and a.get("Pid")}


def test_replicas_run_openmp_passive_unless_the_environment_says_otherwise(monkeypatch):
    from serving.app import replica_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert replica_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own choice is kept
    assert replica_env() == {"OMP_WAIT_POLICY": "ACTIVE"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_index_version_swap_under_traffic_fails_no_request(served, reference):
    from sharding.manifest import switch_latest
    from sharding.storage import resolve

    url, _, root, probe, rows = served
    assert reference["v-00002"][probe][0] != reference["v-00001"][probe][0]  # the swap is visible
    stop, results, errors = threading.Event(), [], []
    pool, futures = load(url, [probe, *QUERIES], stop, results, errors)
    time.sleep(2)
    switch_latest(resolve(str(root)), "v-00002")
    r = post(url, "/admin/reload", {})
    t_switched = time.monotonic()
    assert r.status_code == 200 and r.json()["changed"] and r.json()["version"] == "v-00002", r.text
    assert r.json()["previous"] == "v-00001"
    time.sleep(3)
    stop.set()
    for f in futures:
        f.result()
    pool.shutdown()
    assert not errors, errors[:5]
    versions = {v for _, _, v, _ in results}
    assert versions == {"v-00001", "v-00002"}, versions
    wrong = [(q, v, ids) for q, ids, v, _ in results if ids != reference[v][q]]
    assert not wrong, wrong[:3]  # each answer is exactly its version's, never a mix
    late = [v for _, _, v, t in results if t > t_switched]  # sent after the reload answered
    assert late and set(late) == {"v-00002"}
    assert search_ids(url, probe)[0] == reference["v-00002"][probe]
    assert rows[-1]["_id"] in {h["doc_id"] for h in post(url, "/v1/search", {"query": probe, "k": 1}).json()["data"]}
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["ready"] and health["version"] == "v-00002"  # unauthenticated: a name, never a path
    assert str(root) not in requests.get(f"{url}/healthz", timeout=30).text


@pytest.mark.timeout(300)
def test_a_version_without_a_lexical_part_serves_dense_under_auto_and_refuses_lexical(served):
    """Last (it switches the version): v-00003 is v-00002 without BM25 shards. retrieval.mode auto follows it as
    dense; a request for lexical or hybrid on it is a 400 that says why and what to do."""
    import shutil

    from serving.rag import LocalRetriever
    from sharding.manifest import read_index_manifest, switch_latest, write_index_manifest
    from sharding.storage import resolve

    url, _, root, probe, _ = served
    shutil.copytree(root / "v-00002", root / "v-00003")
    shutil.rmtree(root / "v-00003" / "lexical")
    m = read_index_manifest(resolve(str(root / "v-00003")))
    write_index_manifest(resolve(str(root / "v-00003")), m.model_copy(update={"lexical": None, "version": "v-00003"}))
    switch_latest(resolve(str(root)), "v-00003")
    r = post(url, "/admin/reload", {})
    assert r.status_code == 200 and r.json()["version"].endswith("v-00003"), r.text
    local = LocalRetriever(str(root / "v-00003"))  # auto: dense here
    for q in [probe, *QUERIES[:2]]:
        body = search_body(url, q, k=5)
        assert body["mode"] == "dense" and body["version"].endswith("v-00003")
        assert [h["chunk_id"] for h in body["data"]] == [p.chunk_id for p in local.search(q, 5)]
    for mode in ("lexical", "hybrid"):
        r = post(url, "/v1/search", {"query": probe, "mode": mode})
        assert_openai_error(r, 400, "lexical_unavailable", "mode")
        assert f"mode = {mode!r} needs a lexical (BM25) part" in r.json()["error"]["message"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": probe}], "max_tokens": 2,
            "retrieval": {"mode": "hybrid"}}
    assert_openai_error(post(url, "/v1/chat/completions", chat), 400, "lexical_unavailable", "retrieval.mode")


@pytest.mark.timeout(300)
def test_add_and_delete_under_traffic_fail_no_request_and_gc_keeps_the_leased_version(served):
    """Last (it writes versions): from v-00002, `ragtune index add` of a new document and `delete` of a served
    one, each followed by a reload, under traffic: no request fails, every answer comes from one version, the
    new document is found once its version is served, the deleted one is never returned by a version without it,
    and gc keeps the version the replicas still lease (besides LATEST)."""
    from jobs import freshness
    from sharding.freshness import live_ids
    from sharding.manifest import read_index_manifest, switch_latest
    from sharding.storage import resolve

    url, _, root, _, rows = served
    switch_latest(resolve(str(root)), "v-00002")  # a full version (BM25 too), whatever the tests before left
    assert post(url, "/admin/reload", {}).status_code == 200
    gone = rows[0]  # Super Bowl 50: in the top 5 of the first queries
    v2 = resolve(str(root / "v-00002"))
    ids = live_ids(v2, read_index_manifest(v2))
    gone_ids = {c for c, d in zip(ids["chunk_id"].to_pylist(), ids["doc_id"].to_pylist(), strict=True)
                if d == gone["_id"]}
    new = {"_id": "zorvex1", "title": "Zorvex commission",
           "text": "The Zorvex commission renamed the Lombardi trophy after Ilse Varnhagen in 2031."}
    question = "Who did the Zorvex commission rename the trophy after?"
    stop, results, errors = threading.Event(), [], []
    pool, futures = load(url, [*QUERIES, question], stop, results, errors)
    try:
        time.sleep(1)
        corpus = root.parent / "fresh.jsonl"
        corpus.write_text(json.dumps(new) + "\n")
        added = freshness.add(str(root), corpus=str(corpus))
        assert added.docs_added == 1 and added.embedded_by == "this process"
        r = post(url, "/admin/reload", {})
        assert r.status_code == 200 and r.json()["version"].endswith(added.version), r.text
        for mode in ("dense", "lexical", "hybrid"):
            assert search_body(url, question, k=3, mode=mode)["data"][0]["doc_id"] == "zorvex1", mode
        time.sleep(1)
        deleted = freshness.delete(str(root), doc_ids=[gone["_id"]])
        r = post(url, "/admin/reload", {})
        t_deleted = time.monotonic()
        assert r.status_code == 200 and r.json()["version"].endswith(deleted.version), r.text
        time.sleep(1)
        g = freshness.gc(str(root), keep=1, grace_s=0)  # while traffic runs on the versions it must keep
        time.sleep(1)
    finally:
        stop_load(stop, pool, futures)
    assert not errors, errors[:5]
    served_versions = {v for _, _, v, _ in results}
    assert served_versions <= {"v-00002", added.version, deleted.version}, served_versions
    assert {added.version, deleted.version} <= served_versions, served_versions
    assert any(gone_ids & set(c) for _, c, v, _ in results if v != deleted.version)  # it was served before
    assert not [(q, v) for q, c, v, _ in results if v == deleted.version and gone_ids & set(c)]
    late = [v for _, _, v, t in results if t > t_deleted]
    assert late and set(late) == {deleted.version}
    for mode in ("dense", "lexical", "hybrid"):
        body = search_body(url, gone["text"], k=20, mode=mode)
        assert gone["_id"] not in {h["doc_id"] for h in body["data"]}, mode
    assert g.kept[deleted.version] == "LATEST"
    assert "leased by" in g.kept[added.version], g.kept  # the replicas keep the version before the current one
    assert "v-00002" in g.deleted or "leased by" in g.kept.get("v-00002", "")
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["ready"] and health["version"].endswith(deleted.version)


@pytest.mark.timeout(300)
def test_more_requests_than_the_limit_get_a_429_with_retry_after_at_once_and_every_slot_comes_back(fused):
    """32 streamed chats at once against an app that answers 4 at a time per replica: the excess is refused at once
    with
    OpenAI's 429 and Retry-After (no 500, no wait in a queue), the admitted ones answer in full, and once they have
    ended every slot is free again (the in-flight gauge is 0 and a new request is answered)."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": QUERIES[0]}], "max_tokens": 16,
            "stream": True}
    start = threading.Barrier(32)

    def one(_):
        start.wait()
        t0 = time.monotonic()
        r = post(fused, "/v1/chat/completions", chat)  # reads the whole stream
        return r.status_code, r.headers.get("retry-after"), r.text, time.monotonic() - t0

    with ThreadPoolExecutor(32) as pool:
        out = list(pool.map(one, range(32)))
    statuses = sorted({s for s, *_ in out})
    refused = [(retry, text, dt) for s, retry, text, dt in out if s == 429]
    assert statuses == [200, 429] and 4 <= len(out) - len(refused) < 32, statuses
    for retry, text, _ in refused:
        err = json.loads(text)["error"]
        assert retry == "1" and err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error", err
        assert "limits.max_concurrent_requests" in err["message"]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    assert median([dt for *_, dt in refused]) < median([dt for s, _, _, dt in out if s == 200])  # refused at once
    assert all(text.rstrip().endswith("data: [DONE]") for s, _, text, _ in out if s == 200)
    time.sleep(1)  # a stream's slot is released just after its last byte is sent
    scrapes = [requests.get(f"{fused}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
               for _ in range(8)]  # each from either replica (metrics are per replica)
    assert all("ragtune_requests_in_flight 0.0" in m for m in scrapes)
    rejected = [float(re.search(r"^ragtune_requests_rejected_total (\S+)$", m, re.M).group(1)) for m in scrapes]
    assert 0 < max(rejected) <= len(refused)
    assert search_body(fused, QUERIES[1], k=3)["data"]  # the slots came back


@pytest.mark.timeout(300)
def test_fused_layout_reload_under_traffic_fails_no_request(served, fused):
    """Last: the fused app (still on v-00001: nothing reloaded it) switches under traffic to the version LATEST
    names now (the add and delete test's last, with deltas and tombstones): no request fails, each answer is
    exactly its version's, and every request sent after the reload answered comes from the new version."""
    from serving.rag import LocalRetriever
    from sharding.manifest import resolve_index

    _, _, root, probe, _ = served
    latest = resolve_index(str(root)).uri.rsplit("/", 1)[-1]
    assert search_ids(fused, probe)[1].endswith("v-00001") and latest != "v-00001"
    queries = [probe, *QUERIES]
    reference = {v: {q: [p.chunk_id for p in LocalRetriever(str(root / v)).search(q, 5)] for q in queries}
                 for v in ("v-00001", latest)}
    stop, results, errors = threading.Event(), [], []
    pool, futures = load(fused, queries, stop, results, errors, concurrency=3)  # under the app's limit of 4
    try:
        time.sleep(2)
        r = post(fused, "/admin/reload", {})
        t_switched = time.monotonic()
        assert r.status_code == 200 and r.json()["changed"] and r.json()["version"].endswith(latest), r.text
        time.sleep(3)
    finally:
        stop_load(stop, pool, futures)
    assert not errors, errors[:5]
    assert {v for _, _, v, _ in results} == {"v-00001", latest}
    wrong = [(q, v, ids) for q, ids, v, _ in results if ids != reference[v][q]]
    assert not wrong, wrong[:3]
    late = [v for _, _, v, t in results if t > t_switched]
    assert late and set(late) == {latest}
    health = requests.get(f"{fused}/healthz", timeout=30).json()
    assert health["ready"] and health["version"].endswith(latest)
