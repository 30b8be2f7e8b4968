"""The ``vllm`` generation engine: vLLM's ``AsyncLLM`` inside the Generator replica, on GPU nodes.

UNRUN: vLLM cannot be installed on the machines this was written on (its registry wheels are CUDA builds), so no
line of :class:`VllmEngine` that calls vLLM has been run. It is written to the interfaces vLLM documents for the
version Ray 2.60's ``ray[llm]`` pins (vllm 0.29.0): ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``,
``AsyncLLM.generate(TokensPrompt, SamplingParams, request_id, lora_request=...)`` streaming ``RequestOutput``
values (``output_kind=RequestOutputKind.DELTA``: each carries only the new text and token ids), ``abort``,
``add_lora`` / ``remove_lora`` with ``LoRARequest(lora_name, lora_int_id, lora_path)``, ``shutdown``. What is
tested here is the mapping between ragtune's types and those shapes (the pure functions below, against fixtures
written from vLLM's documentation: tests/serving/fixtures/vllm/) and the wiring, against a fake ``vllm`` module
built from the same shapes. ``bench/gpu_check.sh`` is the check to run on a GPU node that has vllm.

    pip install torch==2.13.0 && pip install -c cluster/constraints-vllm.txt ".[gpu,vllm]"   # a GPU node
    ragtune serve -c configs/serve/gpu-cluster.yaml generator.engine=vllm

What stays ragtune's: the prompt (``serving.rag.rag_prompt`` with this engine's ``tokenizer``, the same folder
vLLM loads) goes in as token ids, so both engines see identical prompts; the API, auth, limits, adapters by name
and the Serve multiplexing are unchanged. What is vLLM's: continuous batching, paged attention, prefix caching
(``generator.vllm.enable_prefix_caching``), fused multi-LoRA, tensor parallelism
(``generator.vllm.tensor_parallel_size`` GPUs per replica, one node: :func:`generator_deployment_options`), the
text of each delta (its incremental detokenizer holds back incomplete characters and, with stop strings, text
that could still become one).

The CPU install never imports vllm: only :meth:`VllmEngine.load` does (tests/serving/test_vllm_engine.py checks
that importing the app's modules leaves it out).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.placement import ReplicaResources
from configs.errors import InvalidRequest, NotFound, RagtuneError, Unavailable
from configs.schema.serve import GeneratorConfig
from models.generators import load_tokenizer, local_model_dir
from serving.generation import Delta, EngineInfo, GenRequest, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("ragtune.serve")

VLLM_VERSION = "0.29.0"  # the vllm that Ray 2.60's ray[llm] pins (pyproject's `vllm` extra)
INSTALL_FIX = ("Fix: install the vllm extra on a GPU node (pip install torch==2.13.0 && pip install -c "
               "cluster/constraints-vllm.txt '.[gpu,vllm]'; the image: cluster/Dockerfile with --build-arg VLLM=1), "
               "or set generator.engine: hf")


# --- requests: ragtune -> vLLM (pure) -------------------------------------------------------------------------------

def engine_args(cfg: GeneratorConfig, model_dir: str) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``AsyncEngineArgs`` for this Generator config.

    ``tokenizer`` is the model's own folder (ragtune builds prompts with the same tokenizer). Tensor parallelism
    above 1 uses vLLM's Ray executor inside the replica's placement group (as Ray Serve LLM does); one GPU runs
    in the replica's own process tree (vLLM's default executor).
    """
    v = cfg.vllm
    args: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "served_model_name": [cfg.name],
        "dtype": cfg.dtype,  # auto | float32 | bfloat16 | float16: vLLM takes the same names
        "max_model_len": cfg.context,  # None = the model's own
        "max_num_seqs": cfg.max_batch_size,  # sequences decoded together at most
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enable_prefix_caching": v.enable_prefix_caching,
        "enforce_eager": v.enforce_eager,
        "enable_lora": bool(cfg.adapters),
        "enable_log_requests": False,
    }
    if cfg.adapters:
        args["max_loras"] = cfg.max_adapters_per_replica  # adapters in one batch at once (Serve's LRU keeps as many)
        args["max_lora_rank"] = v.max_lora_rank
    if v.tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "ray"
    return args


def sampling_kwargs(params: SamplingParams, output_kind: Any) -> dict[str, Any]:
    """Keyword arguments of vLLM's ``SamplingParams`` for one ragtune request.

    ``output_kind`` is vLLM's ``RequestOutputKind.DELTA`` (passed in, so this stays free of vllm). Greedy
    (temperature 0) sends top_p 1: vLLM ignores it then, and older releases refused top_p < 1 with greedy.
    Special tokens are left out of the text, as the hf engine decodes; stop strings are not included in it.
    """
    greedy = params.temperature == 0
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "n": 1,
        "output_kind": output_kind,
    }


def tokens_prompt(prompt_ids: Iterable[int]) -> dict[str, list[int]]:
    """vLLM's ``TokensPrompt`` (a TypedDict): the prompt as token ids, so vLLM does not tokenize again."""
    return {"prompt_token_ids": [int(t) for t in prompt_ids]}


@dataclass
class LoraIds:
    """Stable positive integer ids for adapter names (vLLM's ``lora_int_id``: one id per adapter, > 0).

    The config's adapters are numbered from 1 in sorted order, so every replica gives an adapter the same id;
    names met later get the next ids. An id is never reused for another name, even after an unload.
    """

    ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, names: Iterable[str]) -> LoraIds:
        return cls({n: i for i, n in enumerate(sorted(names), start=1)})

    def id(self, name: str) -> int:
        if name not in self.ids:
            self.ids[name] = max(self.ids.values(), default=0) + 1
        return self.ids[name]


def lora_request_args(name: str, ids: LoraIds, path: str) -> tuple[str, int, str]:
    """Positional arguments of vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)``."""
    return name, ids.id(name), path


# --- streams: vLLM -> ragtune (pure) --------------------------------------------------------------------------------

FINISH = {"stop": "stop", "length": "length", "repetition": "stop"}  # vLLM's finish reasons -> the API's


@dataclass
class StreamState:
    """One request's stream of vLLM ``RequestOutput`` values (DELTA kind) turned into :class:`Delta` values."""

    request_id: str
    completion_tokens: int = 0
    done: bool = False
    aborted: bool = False

    def push(self, output: Any) -> Delta | None:
        """The Delta for one ``RequestOutput`` (its ``outputs[0]`` holds the new text and token ids); None when
        vLLM aborted the request (our cancel: the stream ends without a last delta). A request that vLLM ended
        with an error raises Unavailable."""
        (out,) = output.outputs  # n = 1
        self.completion_tokens += len(out.token_ids)
        reason = out.finish_reason
        if reason is None and not output.finished:
            return Delta(out.text, None, self.completion_tokens)
        self.done = True
        if reason == "abort":
            self.aborted = True
            return None
        if reason not in FINISH:
            raise Unavailable(f"vLLM ended request {self.request_id} with finish_reason {reason!r} after "
                              f"{self.completion_tokens} tokens; the same request may succeed again (see the "
                              "replica's log)", code="engine_error")
        return Delta(out.text, FINISH[reason], self.completion_tokens)


def map_error(e: BaseException, request_id: str, prompt_tokens: int, context: int) -> RagtuneError:
    """A RagtuneError for an exception raised by vLLM's ``generate`` (matched by class name: vllm is not
    importable where this is tested). Request validation (``VLLMValidationError``, a ``ValueError``; prompt
    too long among them) is the client's InvalidRequest; a dead or failed engine is Unavailable."""
    if isinstance(e, RagtuneError):
        return e
    names = {c.__name__ for c in type(e).__mro__}
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    if "EngineDeadError" in names:
        return Unavailable(f"the vLLM engine of this Generator replica died ({msg}); Serve replaces the replica. "
                           "Fix: retry; if it repeats, see the replica's log (GPU memory: lower "
                           "generator.vllm.gpu_memory_utilization or generator.context)", code="engine_dead")
    if "VLLMValidationError" in names or "VLLMClientError" in names or isinstance(e, ValueError):
        if "longer than the maximum model length" in msg or "maximum context length" in msg:
            return InvalidRequest(f"the prompt ({prompt_tokens} tokens) does not fit the context ({context} "
                                  f"tokens): {msg}. Fix: shorten the messages, lower max_tokens, or raise "
                                  "generator.context", param="messages", code="context_length_exceeded")
        return InvalidRequest(f"vLLM refused request {request_id}: {msg}", code="invalid_request")
    return Unavailable(f"vLLM failed on request {request_id} ({type(e).__name__}: {msg}); the same request may "
                       "succeed again", code="engine_error")


# --- placement (pure) -----------------------------------------------------------------------------------------------

def check_resources(cfg: GeneratorConfig, resources: ReplicaResources) -> None:
    """vLLM runs only on GPUs: refuse a replica the placement put on the CPU (a cluster without GPUs)."""
    if resources.device != "gpu":
        raise RagtuneError(f"generator.engine = 'vllm' but the serving plan put the Generator on the CPU (device "
                           f"{resources.device!r}: the cluster has no GPU for it). vLLM runs only on GPUs. Fix: "
                           "serve on GPU nodes, or set generator.engine: hf", param="generator.engine")
    tp = cfg.vllm.tensor_parallel_size
    if resources.num_gpus < tp:
        raise RagtuneError(f"generator.vllm.tensor_parallel_size = {tp} but the replica reserves "
                           f"{resources.num_gpus:g} GPU(s). Fix: plan it with plan_serving(..., "
                           f"generator_gpus={tp})", param="generator.vllm.tensor_parallel_size")


def generator_deployment_options(cfg: GeneratorConfig, r: ReplicaResources) -> dict[str, Any]:
    """The Generator deployment's Serve resource options for its plan ``r``.

    hf, or vllm on one GPU: the replica actor reserves ``r`` itself. vllm with tensor parallelism (``r.num_gpus``
    = tensor_parallel_size > 1): a placement group per replica, as Serve's replica scheduling guide and Ray Serve
    LLM do it: the replica actor (CPUs, no GPU) sits in the first bundle, vLLM's Ray workers take one GPU bundle
    each, STRICT_PACK keeps them on one node (tensor parallelism across nodes is slow).
    """
    gpus = int(r.num_gpus) if cfg.engine == "vllm" and r.device == "gpu" else 0
    if gpus <= 1:
        return {"ray_actor_options": {"num_cpus": r.num_cpus, **({"num_gpus": r.num_gpus} if r.num_gpus else {})}}
    return {"ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": 0},
            "placement_group_bundles": [{"CPU": r.num_cpus, "GPU": 1.0}] + [{"GPU": 1.0}] * (gpus - 1),
            "placement_group_strategy": "STRICT_PACK"}


# --- the engine ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Vllm:
    """The vLLM classes an engine calls (imported in :meth:`VllmEngine.load`, never at module import)."""

    SamplingParams: Any
    LoRARequest: Any
    delta: Any  # RequestOutputKind.DELTA


class VllmEngine:
    """A ``serving.engine.Engine`` over vLLM's ``AsyncLLM`` (see the module's docstring: unrun here)."""

    def __init__(self, llm: Any, api: _Vllm, tokenizer: PreTrainedTokenizerBase, cfg: GeneratorConfig,
                 context: int, resources: ReplicaResources):
        self.llm, self.api, self._tokenizer, self.cfg = llm, api, tokenizer, cfg
        self._context = context
        self.resources = resources
        self.lora_ids = LoraIds.of(cfg.adapters)
        self.loras: dict[str, Any] = {}  # name -> the LoRARequest vLLM knows it by
        self.running: set[str] = set()

    @classmethod
    def load(cls, cfg: GeneratorConfig, resources: ReplicaResources) -> VllmEngine:
        """Start vLLM for ``cfg`` on the replica's GPUs (``resources`` is the placement's plan)."""
        check_resources(cfg, resources)
        try:
            from vllm import SamplingParams as VllmSamplingParams
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.lora.request import LoRARequest
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise RagtuneError(f"generator.engine = 'vllm' but vllm cannot be imported here ({e}). "
                               + INSTALL_FIX, param="generator.engine") from None
        model_dir = local_model_dir(cfg.model)
        args = AsyncEngineArgs(**engine_args(cfg, model_dir))
        if cfg.vllm.tensor_parallel_size > 1:  # vLLM's Ray workers go into this replica's placement group
            from ray.util.placement_group import get_current_placement_group

            config = args.create_engine_config()
            config.parallel_config.placement_group = get_current_placement_group()
            llm = AsyncLLM.from_vllm_config(config)
        else:
            llm = AsyncLLM.from_engine_args(args)
        context = cfg.context or int(llm.model_config.max_model_len)
        log.info("vllm engine: %s, context %d, %d GPU(s)", cfg.model, context, cfg.vllm.tensor_parallel_size)
        return cls(llm, _Vllm(VllmSamplingParams, LoRARequest, RequestOutputKind.DELTA), load_tokenizer(model_dir),
                   cfg, context, resources)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def context(self) -> int:
        return self._context

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if adapter not in self.loras:
            raise NotFound(f"adapter {adapter!r} is not loaded on this replica (loaded: {sorted(self.loras)}). "
                           "Fix: request a model that /v1/models lists", param="model", code="model_not_found")
        return self.loras[adapter]

    async def generate(self, request: GenRequest, request_id: str) -> AsyncGenerator[Delta, None]:
        """vLLM's stream of one request as Deltas. Closing this generator (the client went away) closes vLLM's,
        which aborts the request there; a request that did not finish is also aborted explicitly."""
        n = len(request.prompt_ids)
        if n + 1 > self._context:
            raise InvalidRequest(f"the prompt ({n} tokens) leaves no room for an answer in the context "
                                 f"({self._context} tokens). Fix: shorten the messages or raise generator.context",
                                 param="messages", code="context_length_exceeded")
        lora = self._lora(request.adapter)
        params = self.api.SamplingParams(**sampling_kwargs(request.params, self.api.delta))
        state = StreamState(request_id)
        stream = self.llm.generate(tokens_prompt(request.prompt_ids), params, request_id, lora_request=lora)
        self.running.add(request_id)
        try:
            async for output in stream:  # vLLM ends its stream after the finished output
                if state.done:
                    continue
                delta = state.push(output)
                if delta is not None:
                    yield delta
        except RagtuneError:
            raise
        except Exception as e:  # vLLM's own errors (not GeneratorExit / CancelledError: those pass through)
            raise map_error(e, request_id, n, self._context) from e
        finally:
            self.running.discard(request_id)
            await stream.aclose()
            if not state.done:
                await self.llm.abort(request_id)

    async def cancel(self, request_id: str) -> None:
        if request_id in self.running:
            await self.llm.abort(request_id)

    async def add_adapter(self, name: str, path: str) -> None:
        if name in self.loras:
            return
        if not self.cfg.adapters:
            raise RagtuneError(f"adapter {name!r}: vLLM was started without LoRA (generator.adapters is empty). "
                               "Fix: list the adapter under generator.adapters", param="generator.adapters")
        req = self.api.LoRARequest(*lora_request_args(name, self.lora_ids, local_model_dir(path)))
        try:
            await self.llm.add_lora(req)
        except (OSError, ValueError, RuntimeError) as e:
            raise RagtuneError(f"adapter {name!r} at {path}: vLLM cannot load it ({str(e).splitlines()[0][:200]})."
                               " Fix: point generator.adapters." + name + " at a PEFT folder trained from this base "
                               f"with rank <= generator.vllm.max_lora_rank ({self.cfg.vllm.max_lora_rank})",
                               param=f"generator.adapters.{name}") from None
        self.loras[name] = req

    async def remove_adapter(self, name: str) -> None:
        req = self.loras.pop(name, None)
        if req is not None:
            await self.llm.remove_lora(self.lora_ids.id(name))

    def info(self) -> EngineInfo:
        return EngineInfo(engine="vllm", model=self.cfg.model, context=self._context,
                          device=f"gpu x{self.cfg.vllm.tensor_parallel_size}", adapters=sorted(self.loras),
                          mode="continuous", max_batch_size=self.cfg.max_batch_size, running=len(self.running))

    async def close(self) -> None:
        for request_id in list(self.running):
            await self.llm.abort(request_id)
        self.running.clear()
        self.llm.shutdown()
