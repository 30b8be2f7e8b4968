"""The ``vllm`` engine's mapping and wiring, without vLLM (it cannot be installed here).

What these tests hold the engine to are the shapes vLLM documents, written by hand into
tests/serving/fixtures/vllm/*.json (each file names the documentation it was written from; none was recorded
from a vLLM run). The wiring tests inject a FAKE ``vllm`` package into ``sys.modules``: a few classes built from
the same documented shapes (``AsyncLLM.from_engine_args``, ``generate`` yielding DELTA ``RequestOutput`` values
and aborting its request when it is closed, ``abort``, ``add_lora``, ``remove_lora``, ``shutdown``), which replays
the fixtures. Passing them says the mapping is right against the documentation, not that vLLM runs: the real
runs are the ``gpu`` tests at the end and bench/gpu_check.sh.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.placement import NodeResources, ReplicaResources, plan_serving
from configs import errors
from configs.errors import InvalidRequest, NotFound, RagtuneError, Unavailable
from configs.schema.serve import GeneratorConfig
from serving.engine import Engine
from serving.generation import GenRequest, SamplingParams
from serving.vllm_engine import (
    LoraIds,
    StreamState,
    VllmEngine,
    check_resources,
    engine_args,
    generator_deployment_options,
    lora_request_args,
    map_error,
    sampling_kwargs,
    tokens_prompt,
)
from tests.conftest import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
STREAMS = sorted(p.name for p in FIXTURES.glob("stream_*.json"))
GPU = ReplicaResources(num_cpus=1.0, num_gpus=1.0, threads=1, device="gpu")


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def request_output(d: dict[str, Any]) -> SimpleNamespace:
    """A RequestOutput as vLLM documents it (attributes), from a fixture's dict."""
    return SimpleNamespace(**{**d, "outputs": [SimpleNamespace(**o) for o in d["outputs"]]})


def test_every_fixture_says_it_was_written_from_vllms_documentation():
    for path in FIXTURES.glob("*.json"):
        src = json.loads(path.read_text())["source"]
        assert "documentation" in src["written_from"] and "NOT recorded" in src["written_from"], path.name
        assert src["docs"], path.name


# --- request mapping ------------------------------------------------------------------------------------------------

def test_requests_map_to_vllms_sampling_params_tokens_prompt_and_lora_request():
    fx = fixture("request_mapping.json")
    ids = LoraIds.of(fx["config_adapters"])
    for case in fx["cases"]:
        r = case["ragtune"]
        p = r["params"]
        params = SamplingParams(p["max_tokens"], p["temperature"], p["top_p"], tuple(p["stop"]), p["seed"])
        assert sampling_kwargs(params, "DELTA") == case["sampling_kwargs"]
        assert tokens_prompt(r["prompt_ids"]) == case["tokens_prompt"]
        want = case["lora_request"]
        if want is not None:
            assert list(lora_request_args(r["adapter"], ids, fx["config_adapters"][r["adapter"]])) == want


def test_lora_ids_are_positive_the_same_on_every_replica_and_never_reused():
    a, b = LoraIds.of(["zeta", "alpha"]), LoraIds.of(["alpha", "zeta"])
    assert a.ids == b.ids == {"alpha": 1, "zeta": 2}
    assert a.id("new") == 3 and a.id("new") == 3 and a.id("zeta") == 2 and a.id("other") == 4
    assert LoraIds.of([]).id("first") == 1  # vLLM refuses lora_int_id < 1


def test_engine_args_carry_the_config():
    cfg = GeneratorConfig(model="m", name="base", adapters={"a": "/a"}, max_adapters_per_replica=3, context=2048,
                          engine="vllm", dtype="bfloat16", max_batch_size=64,
                          vllm={"tensor_parallel_size": 2, "max_lora_rank": 32, "enforce_eager": True})
    args = engine_args(cfg, "/models/m")
    assert args == {"model": "/models/m", "tokenizer": "/models/m", "served_model_name": ["base"],
                    "dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 64, "tensor_parallel_size": 2,
                    "gpu_memory_utilization": 0.9, "enable_prefix_caching": True, "enforce_eager": True,
                    "enable_lora": True, "enable_log_requests": False, "max_loras": 3, "max_lora_rank": 32,
                    "distributed_executor_backend": "ray"}
    one = engine_args(GeneratorConfig(model="m", engine="vllm"), "/m")
    assert not one["enable_lora"] and "max_loras" not in one and "distributed_executor_backend" not in one
    assert one["max_model_len"] is None  # vLLM takes the model's own


# --- stream mapping -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STREAMS)
def test_vllm_delta_streams_map_to_deltas(name):
    fx = fixture(name)
    state = StreamState(fx["outputs"][0]["request_id"])
    got = []
    raised = None
    for d in fx["outputs"]:
        try:
            delta = state.push(request_output(d))
        except RagtuneError as e:
            raised = type(e).__name__
            break
        if delta is not None:
            got.append([delta.text, delta.finish_reason, delta.completion_tokens])
    assert got == fx["expect"]
    assert raised == fx.get("raises")
    assert state.done  # every documented stream ends with a finish_reason
    assert state.aborted == (name == "stream_abort.json")


def test_vllm_errors_map_to_the_api_errors():
    for case in fixture("errors.json")["cases"]:
        bases = tuple({"ValueError": ValueError, "Exception": Exception}[b] for b in case["bases"])
        e = type(case["class"], bases, {})(case["message"])
        got = map_error(e, "r1", 4100, 4096)
        assert type(got) is getattr(errors, case["kind"]) and got.code == case["code"], case
    kept = NotFound("x")
    assert map_error(kept, "r", 1, 2) is kept


# --- config and placement -------------------------------------------------------------------------------------------

def test_the_config_refuses_vllm_on_the_cpu_and_tensor_parallelism_with_hf():
    with pytest.raises(ValueError, match="vLLM runs only on GPUs"):
        GeneratorConfig(model="m", engine="vllm", device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size = 2 but generator.engine = 'hf'"):
        GeneratorConfig(model="m", vllm={"tensor_parallel_size": 2})
    auto = GeneratorConfig(model="m", engine="vllm", vllm={"tensor_parallel_size": 4})
    assert (auto.placement_device, auto.gpus_per_replica) == ("gpu", 4)
    hf = GeneratorConfig(model="m", device="auto")
    assert (hf.placement_device, hf.gpus_per_replica) == ("auto", 1)


def plan(cfg: GeneratorConfig, nodes: list[NodeResources]):
    """plan_serving as serving.app.plan_for calls it for this Generator config."""
    return plan_serving(nodes, num_shards=2, generator_replicas=cfg.replicas, generator_device=cfg.placement_device,
                        generator_gpus=cfg.gpus_per_replica)


def test_the_plan_refuses_vllm_without_gpus_and_counts_tensor_parallel_gpus():
    cpu_only = [NodeResources(cpus=8)]
    with pytest.raises(RagtuneError, match="vllm runs only on GPUs"):
        plan(GeneratorConfig(model="m", engine="vllm"), cpu_only)
    tp2 = GeneratorConfig(model="m", engine="vllm", replicas=2, vllm={"tensor_parallel_size": 2})
    p = plan(tp2, [NodeResources(cpus=16, gpus=4), NodeResources(cpus=16, gpus=2)])
    assert (p.generator.num_gpus, p.generator.device) == (2.0, "gpu")
    assert p.searcher.num_gpus == 1.0 and p.searcher.device == "gpu"  # 6 - 2 x 2 GPUs left for 2 groups
    with pytest.raises(RagtuneError, match=r"replicas <= 3"):
        plan(tp2.model_copy(update={"replicas": 4}), [NodeResources(cpus=16, gpus=4), NodeResources(cpus=16, gpus=2)])
    with pytest.raises(RagtuneError, match="no node has 4 GPUs"):
        plan(GeneratorConfig(model="m", engine="vllm", vllm={"tensor_parallel_size": 4}),
             [NodeResources(cpus=8, gpus=2), NodeResources(cpus=8, gpus=2)])
    hf = plan(GeneratorConfig(model="m"), [NodeResources(cpus=8, gpus=1)])
    assert hf.generator.num_gpus == 1.0  # unchanged for hf: one GPU per replica


def test_tensor_parallel_replicas_get_one_placement_group_on_one_node():
    tp2 = GeneratorConfig(model="m", engine="vllm", vllm={"tensor_parallel_size": 2})
    r = ReplicaResources(num_cpus=1.0, num_gpus=2.0, threads=4, device="gpu")
    assert generator_deployment_options(tp2, r) == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}],
        "placement_group_strategy": "STRICT_PACK"}
    one = GeneratorConfig(model="m", engine="vllm")
    assert generator_deployment_options(one, GPU) == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1.0}}
    cpu = ReplicaResources(num_cpus=0.5, num_gpus=0.0, threads=2, device="cpu")
    assert generator_deployment_options(GeneratorConfig(model="m"), cpu) == {"ray_actor_options": {"num_cpus": 0.5}}


def test_a_replica_planned_on_the_cpu_is_refused_before_vllm_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # importing it would fail: the check comes first
    cfg = GeneratorConfig(model="m", engine="vllm")
    cpu = ReplicaResources(num_cpus=1.0, num_gpus=0.0, threads=2, device="cpu")
    with pytest.raises(RagtuneError, match="vLLM runs only on GPUs. Fix: serve on GPU nodes"):
        VllmEngine.load(cfg, cpu)
    with pytest.raises(RagtuneError, match="reserves 1 GPU"):
        check_resources(cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"tensor_parallel_size": 2})}),
                        GPU)


def test_without_vllm_installed_load_says_to_install_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RagtuneError, match="install the vllm extra on a GPU node") as e:
        VllmEngine.load(GeneratorConfig(model="m", engine="vllm"), GPU)
    assert e.value.param == "generator.engine"


def test_importing_the_apps_modules_never_imports_vllm():
    code = ("import sys, jobs.cli, jobs.serve, serving.app, serving.deployments, serving.engine, "
            "serving.vllm_engine; print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# --- wiring, against a FAKE vllm built from the documented shapes ---------------------------------------------------

class FakeAsyncLLM:
    """A fake of vLLM's AsyncLLM, from its documented interface: NOT vLLM. ``generate`` replays a fixture's
    DELTA outputs for the request; an aborted request gets a last output with finish_reason 'abort' (as vLLM's
    output processor sends); closing the generate() generator aborts the request, as AsyncLLM.generate does."""

    script: list[dict[str, Any]] = []
    last: FakeAsyncLLM | None = None

    def __init__(self, args: Any):
        self.args, self.calls, self.aborted, self.loras = args, [], [], {}
        self.model_config = SimpleNamespace(max_model_len=64)
        self.shut = False
        FakeAsyncLLM.last = self

    @classmethod
    def from_engine_args(cls, args: Any) -> FakeAsyncLLM:
        return cls(args)

    async def generate(self, prompt, sampling_params, request_id, *, lora_request=None):
        self.calls.append((prompt, sampling_params, request_id, lora_request))
        try:
            for d in self.script:
                await asyncio.sleep(0)
                if request_id in self.aborted:
                    yield request_output({**d, "finished": True, "outputs": [
                        {**d["outputs"][0], "text": "", "token_ids": [], "finish_reason": "abort"}]})
                    return
                yield request_output({**d, "request_id": request_id})
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def add_lora(self, req):
        self.loras[req.lora_int_id] = req
        return True

    async def remove_lora(self, lora_id):
        return self.loras.pop(lora_id, None) is not None

    def shutdown(self):
        self.shut = True


def fake_vllm(monkeypatch) -> None:
    """Put the fake ``vllm`` package (only what serving.vllm_engine imports) into sys.modules."""
    def module(name: str, **attrs: Any) -> None:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)

    class Kwargs:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    module("vllm", SamplingParams=Kwargs)
    module("vllm.engine")
    module("vllm.engine.arg_utils", AsyncEngineArgs=Kwargs)
    module("vllm.lora")
    module("vllm.lora.request", LoRARequest=LoRARequest)
    module("vllm.sampling_params", RequestOutputKind=SimpleNamespace(DELTA="DELTA"))
    module("vllm.v1")
    module("vllm.v1.engine")
    module("vllm.v1.engine.async_llm", AsyncLLM=FakeAsyncLLM)


@pytest.fixture
def engine(monkeypatch, tiny_model_dir) -> VllmEngine:
    fake_vllm(monkeypatch)
    FakeAsyncLLM.script = fixture("stream_length.json")["outputs"]
    cfg = GeneratorConfig(model=tiny_model_dir, engine="vllm", adapters={"lora": "/adapters/lora"})
    return VllmEngine.load(cfg, GPU)


def test_the_generator_config_chooses_the_vllm_engine_through_load_engine(monkeypatch, tiny_model_dir):
    from serving.engine import load_engine

    fake_vllm(monkeypatch)  # the fake above, not vLLM: this checks the wiring from the config to the engine
    FakeAsyncLLM.script = fixture("stream_length.json")["outputs"]
    engine = load_engine(GeneratorConfig(model=tiny_model_dir, engine="vllm"), GPU)
    assert isinstance(engine, VllmEngine) and engine.info().engine == "vllm"


async def collect(stream):
    return [[d.text, d.finish_reason, d.completion_tokens] async for d in stream]


def test_the_engine_streams_vllms_outputs_as_deltas(engine):
    assert isinstance(engine, Engine)
    llm = FakeAsyncLLM.last
    assert llm.args.kwargs["model"] == engine.cfg.model and llm.args.kwargs["enable_lora"]
    assert engine.context == 64  # the model's max_model_len, as vLLM reports it
    ids = engine.tokenizer("Where was Ana born?", add_special_tokens=False)["input_ids"]
    got = asyncio.run(collect(engine.generate(GenRequest(ids, SamplingParams(5, stop=("\n",))), "req-1")))
    assert got == fixture("stream_length.json")["expect"]
    prompt, params, request_id, lora = llm.calls[0]
    assert prompt == {"prompt_token_ids": ids} and request_id == "req-1" and lora is None
    assert params.kwargs["output_kind"] == "DELTA" and params.kwargs["stop"] == ["\n"]
    assert llm.aborted == [] and engine.running == set()  # finished: nothing to abort
    assert engine.info().engine == "vllm" and engine.info().running == 0


def test_adapters_go_to_vllm_as_lora_requests_with_stable_ids(engine, tmp_path):
    req = GenRequest([5, 6], SamplingParams(5), "lora")
    with pytest.raises(NotFound, match="not loaded"):
        asyncio.run(collect(engine.generate(req, "r0")))
    asyncio.run(engine.add_adapter("lora", str(tmp_path)))
    llm = FakeAsyncLLM.last
    assert [(r.lora_name, r.lora_int_id, r.lora_path) for r in llm.loras.values()] == [("lora", 1, str(tmp_path))]
    asyncio.run(collect(engine.generate(req, "r1")))
    assert llm.calls[-1][3] is llm.loras[1]
    assert engine.info().adapters == ["lora"]
    asyncio.run(engine.remove_adapter("lora"))
    assert llm.loras == {} and engine.info().adapters == []
    with pytest.raises(RagtuneError, match="started without LoRA"):
        no_lora = VllmEngine(llm, engine.api, engine.tokenizer, GeneratorConfig(model="m", engine="vllm"), 64, GPU)
        asyncio.run(no_lora.add_adapter("x", str(tmp_path)))


def test_cancel_aborts_the_request_in_vllm_and_ends_the_stream(engine):
    async def run():
        got = []
        async for d in engine.generate(GenRequest([5], SamplingParams(5)), "req-c"):
            got.append(d.text)
            if len(got) == 2:
                await engine.cancel("req-c")
        return got

    got = asyncio.run(run())
    assert got == [" Oph", "ir"]  # vLLM's abort output ends the stream, with no last delta
    assert FakeAsyncLLM.last.aborted == ["req-c"] and engine.running == set()
    asyncio.run(engine.cancel("req-c"))  # unknown or finished: nothing happens
    assert FakeAsyncLLM.last.aborted == ["req-c"]


def test_closing_the_generator_aborts_the_request_in_vllm(engine):
    async def run():
        stream = engine.generate(GenRequest([5], SamplingParams(5)), "req-g")
        first = await stream.__anext__()
        await stream.aclose()  # the client went away
        return first

    assert asyncio.run(run()).text == " Oph"
    assert "req-g" in FakeAsyncLLM.last.aborted and engine.running == set()


def test_a_prompt_without_room_is_refused_before_vllm_sees_it(engine):
    with pytest.raises(InvalidRequest, match="leaves no room") as e:
        asyncio.run(collect(engine.generate(GenRequest(list(range(64)), SamplingParams(5)), "long")))
    assert e.value.code == "context_length_exceeded" and FakeAsyncLLM.last.calls == []


def test_vllm_errors_during_generate_become_api_errors(engine, monkeypatch):
    class EngineDeadError(Exception):
        pass

    async def dead(*args, **kwargs):
        raise EngineDeadError("EngineCore encountered an issue.")
        yield  # an async generator, as AsyncLLM.generate is

    monkeypatch.setattr(FakeAsyncLLM.last, "generate", dead)
    with pytest.raises(Unavailable, match="died") as e:
        asyncio.run(collect(engine.generate(GenRequest([5], SamplingParams(5)), "d")))
    assert e.value.code == "engine_dead" and "d" in FakeAsyncLLM.last.aborted


def test_close_aborts_running_requests_and_shuts_vllm_down(engine):
    async def run():
        stream = engine.generate(GenRequest([5], SamplingParams(5)), "req-x")
        await stream.__anext__()
        await engine.close()
        await stream.aclose()

    asyncio.run(run())
    assert FakeAsyncLLM.last.shut and "req-x" in FakeAsyncLLM.last.aborted


# --- real runs (a GPU node with vllm installed; never run where this was written) -----------------------------------

@pytest.mark.gpu
def test_vllm_greedy_equals_transformers_on_the_tiny_model(tiny_model_dir):
    pytest.importorskip("vllm", reason="needs the vllm extra (a GPU node)")
    from models.generators import load_model, load_tokenizer

    cfg = GeneratorConfig(model=tiny_model_dir, engine="vllm", vllm={"gpu_memory_utilization": 0.3,
                                                                     "enforce_eager": True})
    engine = VllmEngine.load(cfg, GPU)
    tok = load_tokenizer(tiny_model_dir)
    ids = tok("Where was Ana born? In", add_special_tokens=False)["input_ids"]
    got = asyncio.run(collect(engine.generate(GenRequest(ids, SamplingParams(8)), "g1")))
    import torch

    model = load_model(tiny_model_dir).eval()
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    assert "".join(t for t, _, _ in got) == tok.decode(out[0, len(ids):], skip_special_tokens=True)
    asyncio.run(engine.close())
