#!/usr/bin/env bash
# The vllm engine's check on a GPU node that has vllm installed (it has never run: no machine ragtune was built on
# could install vllm). Run it from the repository root, after the merge of issue 16 (the Generator holds an Engine
# from serving.engine.load_engine):
#
#   pip install torch==2.13.0 && pip install -c cluster/constraints-vllm.txt ".[gpu,vllm,dev]"
#   bash bench/gpu_check.sh                                  # the tiny model built here (parity, wiring only)
#   bash bench/gpu_check.sh --model /models/Qwen2.5-0.5B-Instruct --chats 256 --max-tokens 128   # real numbers
#
# 1. greedy parity with transformers: the same prompt ids through VllmEngine and through transformers' generate,
#    for the base and for a LoRA adapter (random weights on q_proj/v_proj, so it changes the output): equal text.
# 2. the app end to end with generator.engine=vllm: a streamed RAG chat equals the same chat unstreamed, a stop
#    sequence ends it (finish_reason stop, the stop text left out), /v1/models lists the adapter, a chat with it.
# 3. --chats streamed RAG chats at concurrency 64, engine hf (on the GPU) then vllm, same card, same app, same
#    questions: generated tokens/s, time to first token p50/p99. Printed as a table; nothing is written elsewhere.
#
# Exits non-zero at the first failed check. Needs: one CUDA GPU (tensor_parallel_size 1), vllm 0.29.0.
set -euo pipefail

MODEL=""
CHATS=128
MAX_TOKENS=64
CONCURRENCY=64
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --chats) CHATS="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --concurrency) CONCURRENCY="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" \
    TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
WORK="$(mktemp -d -t ragtune-gpu-check-XXXXXX)"
echo "work folder: ${WORK}"

echo "== 0. the node"
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: not a GPU node" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python - <<'EOF'
import torch, vllm
assert torch.cuda.is_available(), "torch sees no CUDA GPU (the CPU build of torch?)"
print(f"torch {torch.__version__}, vllm {vllm.__version__}, {torch.cuda.get_device_name(0)}")
assert vllm.__version__.startswith("0.29.0"), f"vllm {vllm.__version__}: this check is written for 0.29.0"
EOF

echo "== 1. greedy parity with transformers (base and LoRA)"
python - "${WORK}" "${MODEL}" <<'EOF'
import asyncio, sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from cluster.placement import ReplicaResources
from configs.schema.serve import GeneratorConfig
from models.generators import TinySpec, build_tiny, load_model, load_tokenizer
from serving.generation import GenRequest, SamplingParams
from serving.vllm_engine import VllmEngine

work, model = Path(sys.argv[1]), sys.argv[2]
if not model:
    texts = [f"What is the capital of Zal{i}? Ophir{i % 7}. Where was Ana born? In Ophir." for i in range(300)]
    model = str(build_tiny(work / "tiny", texts, TinySpec()))
(work / "model").write_text(model)
torch.manual_seed(1)
lora = get_peft_model(load_model(model), LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj"]))
lora.save_pretrained(work / "lora")
tok = load_tokenizer(model)
prompts = ["What is the capital of Zal3?", "Where was Ana born? In", "The history of the city is"]
N = 24


def reference(m, ids):
    x = torch.tensor([ids], device=m.device)
    with torch.inference_mode():
        out = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True, clean_up_tokenization_spaces=False)


cfg = GeneratorConfig(model=model, engine="vllm", adapters={"lora": str(work / "lora")}, dtype="float32",
                      vllm={"gpu_memory_utilization": 0.4, "max_lora_rank": 8})


async def vllm_texts():
    engine = VllmEngine.load(cfg, ReplicaResources(num_cpus=1, num_gpus=1, threads=1, device="gpu"))
    await engine.add_adapter("lora", str(work / "lora"))
    out = {}
    for adapter in (None, "lora"):
        for i, p in enumerate(prompts):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            deltas = [d async for d in engine.generate(GenRequest(ids, SamplingParams(N), adapter), f"{adapter}{i}")]
            out[(adapter, p)] = "".join(d.text for d in deltas)
    await engine.close()
    return out


got = asyncio.run(vllm_texts())
base = load_model(model, dtype=torch.float32).cuda().eval()
peft = PeftModel.from_pretrained(load_model(model, dtype=torch.float32), str(work / "lora")).cuda().eval()
failed = 0
for (adapter, p), text in got.items():
    want = reference(peft if adapter else base, tok(p, add_special_tokens=False)["input_ids"])
    ok = text == want
    failed += not ok
    print(f"{'PASS' if ok else 'FAIL'} {adapter or 'base':5s} {p!r}: vllm {text!r}" + ("" if ok else f" hf {want!r}"))
sys.exit(1 if failed else 0)
EOF

echo "== 2 and 3. the app end to end, then ${CHATS} RAG chats at concurrency ${CONCURRENCY}: hf vs vllm"
python - "${WORK}" "${CHATS}" "${MAX_TOKENS}" "${CONCURRENCY}" <<'EOF'
import asyncio, json, statistics, sys, time
from pathlib import Path

import httpx
from ray import serve

from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig
from jobs.embed import run as embed
from jobs.index import run as index
from jobs.serve import wait_ready
from serving.app import ServeAppArgs, build_app

work, chats, max_tokens, conc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = (work / "model").read_text()
docs = sorted(Path("docs").glob("*.md"))
corpus = work / "corpus.jsonl"
with open(corpus, "w") as f:
    for n, p in enumerate(docs):
        for k, part in enumerate(p.read_text().split("\n\n")):
            if len(part) > 80:
                f.write(json.dumps({"_id": f"{n}-{k}", "title": p.stem, "text": part}) + "\n")
embed(EmbedJobConfig.model_validate({"corpus": {"path": str(corpus), "id_field": "_id"},
                                     "output": {"path": str(work / "emb"), "num_parts": 1}}))
index(IndexJobConfig.model_validate({"embeddings": {"path": str(work / "emb")},
                                     "index": {"path": str(work / "index"), "kind": "Flat", "shards": 1}}))
questions = [json.loads(line)["text"][:120] + " What does this say?" for line in open(corpus)][:chats]
questions = (questions * (chats // max(1, len(questions)) + 1))[:chats]
url = "http://127.0.0.1:8000"


def config(engine: str) -> ServeJobConfig:
    return ServeJobConfig.model_validate({
        "index": {"path": str(work / "index"), "poll_interval_s": None},
        "generator": {"model": model, "name": "base", "adapters": {"lora": str(work / "lora")}, "engine": engine,
                      "device": "gpu", "max_batch_size": conc, "vllm": {"max_lora_rank": 8,
                                                                          "gpu_memory_utilization": 0.5},
                      "defaults": {"max_tokens": max_tokens}},
        "auth": {"api_keys_env": None}, "limits": {"request_timeout_s": 600, "max_tokens": 4096},
        "serve": {"access_log": False}})


def chat(question: str, **kw) -> dict:
    return {"model": "base", "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}], **kw}


async def streamed(client: httpx.AsyncClient, body: dict) -> tuple[str, str | None, float, int]:
    """(text, finish_reason, seconds to the first content, completion tokens) of one streamed chat."""
    t0, first, text, reason, tokens = time.perf_counter(), None, "", None, 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for c in event.get("choices", []):
                if c["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    text += c["delta"]["content"]
                reason = c.get("finish_reason") or reason
    return text, reason, first if first is not None else float("nan"), tokens


async def end_to_end() -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        models = (await client.get(url + "/v1/models")).json()
        assert {m["id"] for m in models["data"]} >= {"base", "lora"}, models
        whole = (await client.post(url + "/v1/chat/completions", json=chat(questions[0]))).json()
        text, reason, _, _ = await streamed(client, chat(questions[0]))
        assert text == whole["choices"][0]["message"]["content"], (text, whole)
        assert reason == whole["choices"][0]["finish_reason"]
        if len(text) > 4:
            stop = text[len(text) // 2: len(text) // 2 + 2]
            cut, reason, _, _ = await streamed(client, chat(questions[0], stop=[stop]))
            assert reason == "stop" and cut == text[: text.index(stop)], (cut, stop, text)
        adapted, _, _, _ = await streamed(client, {**chat(questions[0]), "model": "lora"})
        print(f"PASS end to end: stream == whole ({len(text)} chars), stop ends it, adapter answers "
              f"({len(adapted)} chars)")


async def load() -> dict:
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=conc)) as client:
        async def one(q: str):
            async with sem:
                return await streamed(client, chat(q))

        await asyncio.gather(*(one(q) for q in questions[:conc]))  # warm up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(q) for q in questions))
        wall = time.perf_counter() - t0
    ttft = sorted(r[2] for r in results)
    return {"tokens/s": sum(r[3] for r in results) / wall, "ttft p50 ms": 1e3 * statistics.median(ttft),
            "ttft p99 ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], "chats/s": len(results) / wall}


serve.start(http_options={"host": "127.0.0.1", "port": 8000})
table = {}
for engine in ("vllm", "hf"):
    serve.run(build_app(ServeAppArgs(config=config(engine).model_dump(mode="json"))), name="check", route_prefix="/")
    wait_ready(url)
    if engine == "vllm":
        asyncio.run(end_to_end())
    table[engine] = asyncio.run(load())
    serve.delete("check")
serve.shutdown()
print(f"\n{chats} streamed RAG chats, concurrency {conc}, max_tokens {max_tokens}, greedy, one GPU, model {model}")
print(f"{'engine':8s} {'tokens/s':>10s} {'chats/s':>9s} {'TTFT p50 ms':>12s} {'TTFT p99 ms':>12s}")
for engine, r in table.items():
    print(f"{engine:8s} {r['tokens/s']:10.0f} {r['chats/s']:9.2f} {r['ttft p50 ms']:12.0f} {r['ttft p99 ms']:12.0f}")
print(f"vllm / hf: tokens/s x{table['vllm']['tokens/s'] / table['hf']['tokens/s']:.2f}, TTFT p99 "
      f"x{table['vllm']['ttft p99 ms'] / table['hf']['ttft p99 ms']:.2f}")
EOF
echo "all checks passed; work folder ${WORK}"
