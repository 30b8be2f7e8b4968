"""The generation engine interface, free of Serve.

An engine turns a request's prompt token ids into an async stream of text deltas. Prompt assembly (the RAG
prompt, the chat template, the context budget: ``serving.rag.rag_prompt``, ``models.prompt.completion_prompt``)
stays above it and is shared by every engine: it needs only the engine's ``tokenizer`` and ``context``. The
Generator deployment holds one engine; in-process answering (the compare job) can hold one too.

Engines:

- ``hf`` (``serving.generation.HFEngine``): a transformers causal LM with PEFT LoRA adapters chosen per row;
  continuous batching (requests join the running batch at step boundaries and leave when done), with the old
  static batching kept as a mode for comparison.
- ``vllm`` (``serving.vllm_engine``): vLLM's ``AsyncLLM`` on GPU nodes, LoRA adapters as vLLM LoRA requests.
  vLLM cannot be installed here: that path is built to vLLM's documented interfaces and is unrun.

The types engines share (``GenRequest``, ``SamplingParams``, ``Delta``, ``EngineInfo``) are defined in
``serving.generation`` (which this module imports for the hf engine) and importable from here.

Contract, shared by every engine (tests hold each engine to it):

- ``generate(request, request_id)`` yields :class:`serving.generation.Delta` values: the text that became certain
  since the last delta (never a partial UTF-8 character, never the start of a stop sequence that may still
  complete), ``completion_tokens`` so far; the last delta has ``finish_reason`` "stop" or "length" and nothing
  follows it. An adapter that is not loaded, or a prompt that leaves no room in the context, raises
  ``configs.errors.RagtuneError`` before the first delta. An engine that queues may refuse a request it cannot
  finish by ``request.deadline`` with ``configs.errors.Overloaded`` (a 429), also before the first delta (hf
  does; vLLM's scheduler does not look at it).
- ``cancel(request_id)`` (or closing the async generator, e.g. when the client went away) ends the request at the
  next step boundary and frees its slot; the stream of a request cancelled by id ends without a last delta;
  cancelling an unknown or finished id does nothing.
- ``add_adapter(name, path)`` loads a PEFT folder under ``name``; ``remove_adapter(name)`` unloads it (requests
  already running with it finish first or keep it until they do).
- ``info()`` says what the engine is and holds now.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cluster.placement import ReplicaResources
from configs.errors import RagtuneError
from configs.schema.serve import GeneratorConfig
from serving.generation import Delta, EngineInfo, GenRequest, HFEngine, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Delta", "Engine", "EngineInfo", "GenRequest", "SamplingParams", "load_engine"]


@runtime_checkable
class Engine(Protocol):
    """A generation engine: see the module's docstring for the contract."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def context(self) -> int: ...

    def generate(self, request: GenRequest, request_id: str) -> AsyncGenerator[Delta, None]: ...

    async def cancel(self, request_id: str) -> None: ...

    async def add_adapter(self, name: str, path: str) -> None: ...

    async def remove_adapter(self, name: str) -> None: ...

    def info(self) -> EngineInfo: ...

    async def close(self) -> None: ...


def load_engine(cfg: GeneratorConfig, resources: ReplicaResources, max_wait_s: float | None = None) -> Engine:
    """The engine ``generator.engine`` names, loaded with the replica's resources (device, threads). ``max_wait_s``
    bounds the hf engine's queue in seconds (vLLM's scheduler keeps its own queue).

    Raises:
        RagtuneError: ``vllm`` where vLLM (or ``serving.vllm_engine``) cannot be imported.
    """
    if cfg.engine == "vllm":
        try:  # vLLM only on GPU nodes that have it: never imported by the CPU install
            from serving.vllm_engine import VllmEngine

            return VllmEngine.load(cfg, resources)
        except ImportError as e:
            raise RagtuneError(f"generator.engine = vllm, but vLLM cannot be imported here ({e}). Fix: run the "
                               "Generator on a GPU node with the vllm extra installed (pip install 'ragtune[vllm]', "
                               "or the GPU image), or use generator.engine: hf", param="generator.engine",
                               code="engine_unavailable") from None
    return HFEngine.load(cfg, resources, max_wait_s)
