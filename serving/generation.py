"""Generation with a transformers causal LM, pure of Serve: the ``hf`` engine (``HFEngine``) and the step code
it shares with in-process answering (``Decoder``).

Every request has its own prompt, token budget, sampling (greedy, temperature, top-p, seed), stop sequences and
LoRA adapter. Adapters are loaded into one ``peft.PeftModel`` over the shared base and chosen per row with PEFT's
``adapter_names`` (``"__base__"`` = no adapter), so one batch can mix them.

The step code (``Decoder``): a *prefill* runs a set of prompts, left-padded into one (B, L) batch with position
ids from the attention mask, and gives each row its first token; a *decode* step feeds one token per row through
the KV cache (a transformers ``DynamicCache``, (B, heads, T, head_dim) per layer). Greedy rows are sampled
together on the device (one argmax over the batch); rows with a temperature are sampled per row on the CPU with
their own seeded generator.

Two ways of batching, one engine (``HFEngine``, ``generator.decoding``):

- ``continuous``: requests join the running batch at step boundaries (the newcomers are prefilled together, then
  their KV cache is merged into the running batch's: the shorter side is left-padded along the sequence axis, the
  attention mask and position ids keep every row's tokens where they were) and leave when done (their rows are
  dropped and the columns that became padding for every row are trimmed). A request arriving mid-decode waits
  for one step, not for the batch; finished rows cost nothing.
- ``static``: a batch is formed from the waiting requests, decoded to its end (finished rows keep stepping a pad
  token, their output ignored), then the next. Kept to measure the difference (``bench/generation.py``) and for
  models whose cache cannot be merged (sliding-window layers).

Text is streamed as it is decoded: each step gives, per request, the text that is now certain (a trailing
incomplete UTF-8 character, or the start of a possible stop sequence, is held back until the next step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from configs.errors import Conflict, InvalidRequest, NotFound, Overloaded, RagtuneError, Unavailable
from models.generators import load_model, load_tokenizer, local_model_dir
from models.hardware import resolve_device

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

    from cluster.placement import ReplicaResources
    from configs.schema.serve import GeneratorConfig

log = logging.getLogger("ragtune.serve")

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples: ``temperature`` 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenRequest:
    """One sequence to continue: prompt token ids, sampling, and the adapter (None = the base model).
    ``deadline``: when the caller stops waiting for it (``time.time()`` seconds, a wall clock, so that the time it
    spent in queues before the engine counts, on another node too); an engine may refuse at once a request it
    cannot finish by then (None = no deadline)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    deadline: float | None = None


@dataclass
class Delta:
    """New text of one request after a step; ``finish_reason`` is set on its last delta (stop | length).
    ``batch``: the requests decoded together in the step that gave it."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    batch: int = 1


@dataclass(frozen=True)
class EngineInfo:
    """What an engine (``serving.engine.Engine``) is and holds: its kind, model, context, device, adapters and
    batch state."""

    engine: str  # "hf" | "vllm"
    model: str
    context: int
    device: str
    adapters: list[str] = field(default_factory=list)
    mode: str = "continuous"  # "continuous" | "static"
    max_batch_size: int = 1
    running: int = 0  # requests decoding now
    waiting: int = 0  # requests queued for a slot


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    """Decoding state of one request."""

    req: GenRequest
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]
    context: int
    rng: torch.Generator
    rid: str = ""  # the engine's request id
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    done: bool = False
    last: int = 0  # the token fed at the next step (a pad once done)
    pos: int = 0  # its position id

    def sample(self, logits: torch.Tensor) -> int:
        """A token from this row's logits (vocab,) on the CPU, with its temperature and top-p."""
        import torch

        p = self.req.params
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p  # the smallest prefix reaching top_p (>= 1 token)
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.rng))

    def push(self, token: int) -> Delta:
        """Take the sampled token; return the text that became certain, and whether the request is done."""
        p = self.req.params
        if token in self.eos_ids:
            return self._finish("stop", self._text())
        self.generated.append(token)
        text = self._text()
        for s in p.stop:  # earliest stop sequence in the text not yet sent (+ what could straddle the boundary)
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                return self._finish("stop", text[:at])
        if len(self.generated) >= p.max_tokens or len(self.req.prompt_ids) + len(self.generated) >= self.context:
            return self._finish("length", text)
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD until it completes
        hold = max((j for s in p.stop for j in range(1, len(s)) if text[:safe].endswith(s[:j])), default=0)
        safe = max(self.sent, safe - hold)
        out, self.sent = text[self.sent:safe], safe
        return Delta(out, None, len(self.generated))

    def _text(self) -> str:
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert isinstance(text, str)  # one sequence of ids decodes to one text
        return text

    def _finish(self, reason: str, text: str) -> Delta:
        self.done = True
        out = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return Delta(out, reason, len(self.generated))


@dataclass
class _Batch:
    """Rows decoding together and their KV cache: ``mask`` (B, T) is 1 where a column holds a token of that row
    (left padding: each row's tokens are the last columns), T the cache's length."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


def merge_batches(a: _Batch, b: _Batch) -> _Batch:
    """One batch of the rows of ``a`` then ``b``, in ``a``'s cache: the shorter side is left-padded along the
    sequence axis (zeros, masked), so every row keeps its tokens and positions."""
    T = max(a.mask.shape[1], b.mask.shape[1])
    Ba = len(a.rows)

    def stack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (Ba, ..., Ta, D) + (Bb, ..., Tb, D)
        out = x.new_zeros((Ba + y.shape[0], *x.shape[1:-2], T, x.shape[-1]))
        out[:Ba, ..., T - x.shape[-2]:, :] = x
        out[Ba:, ..., T - y.shape[-2]:, :] = y
        return out

    for la, lb in zip(_layers(a.cache), _layers(b.cache), strict=True):
        la.keys, la.values = stack(la.keys, lb.keys), stack(la.values, lb.values)
    mask = a.mask.new_zeros((Ba + len(b.rows), T))
    mask[:Ba, T - a.mask.shape[1]:] = a.mask
    mask[Ba:, T - b.mask.shape[1]:] = b.mask
    return _Batch(a.rows + b.rows, a.cache, mask)


def keep_rows(batch: _Batch, keep: list[int]) -> _Batch:
    """The batch with only the rows ``keep`` (indices), less the leading columns that are padding in every row."""
    import torch

    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    cut = int((mask.sum(0) > 0).int().argmax())  # leading all-pad columns (each row's tokens are its last columns)
    for layer in _layers(batch.cache):
        layer.keys = layer.keys.index_select(0, idx)[..., cut:, :]
        layer.values = layer.values.index_select(0, idx)[..., cut:, :]
    return _Batch([batch.rows[i] for i in keep], batch.cache, mask[:, cut:])


class Decoder:
    """A causal LM, its tokenizer and LoRA adapters, and the step code: ``prefill``, ``decode``.

    One forward pass runs at a time (a lock): PEFT selects adapters per row through hooks registered for the
    duration of a forward call, which two concurrent calls would mix up; adapters load and unload under it too.
    ``stream``/``generate`` decode one static batch synchronously (in-process answering, tests).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 context: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.peft: PeftModel | None = None
        self.lock = threading.Lock()
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(context, limit) if context else limit
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    @classmethod
    def load(cls, name: str, device: Literal["auto", "cpu", "gpu"] = "auto",
             dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", context: int | None = None,
             threads: int | None = None) -> Decoder:
        """Load a base model (hub id, folder or URI) onto ``device`` (auto: a GPU when there is one)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        dev = resolve_device(device)
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if dev.type != "cpu" and torch.cuda.is_bf16_supported() else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        model = load_model(name, dtype=torch_dtype).to(dev)
        return cls(model, load_tokenizer(name), dev, context)

    def mergeable(self) -> bool:
        """Whether the model's KV cache is plain full-attention layers, whose rows can be merged and dropped."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = DynamicCache(config=self.model.config).layers
        return all(type(layer) is DynamicLayer for layer in layers)

    # --- adapters -------------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return [] if self.peft is None else sorted(self.peft.peft_config)

    def add_adapter(self, name: str, path: str) -> None:
        """Load a PEFT adapter folder under ``name`` onto the shared base."""
        from peft import PeftModel

        local = local_model_dir(path)
        with self.lock:
            if name in self.adapters:
                return
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, local, adapter_name=name).eval()
                else:
                    self.peft.load_adapter(local, adapter_name=name)
            except (OSError, ValueError, RuntimeError) as e:
                raise RagtuneError(f"adapter {name!r} at {path}: cannot load it onto the base model "
                                   f"({str(e).splitlines()[0][:200]}). Fix: point generator.adapters.{name} at a "
                                   "PEFT folder trained from this base (a fine-tuning run's outputs/adapter/)") \
                    from None

    def remove_adapter(self, name: str) -> None:
        """Unload ``name`` (an LRU eviction). The last one unloaded leaves the bare base model."""
        with self.lock:
            if self.peft is None or name not in self.peft.peft_config:
                return
            if len(self.peft.peft_config) == 1:  # a PeftModel cannot hold none: back to the base
                self.model = self.peft.unload().eval()
                self.peft = None
                return
            if name in self.peft.active_adapters:  # PEFT keeps a deleted adapter active, and forward looks it up
                self.peft.set_adapter(next(a for a in self.peft.peft_config if a != name))
            self.peft.delete_adapter(name)

    # --- the step code --------------------------------------------------------------------------------------------

    def check(self, r: GenRequest) -> None:
        """Refuse a request this decoder cannot run: an adapter not loaded, a prompt without room to answer."""
        if r.adapter is not None and r.adapter not in self.adapters:
            raise NotFound(f"adapter {r.adapter!r} is not loaded (loaded: {self.adapters})", param="model",
                           code="model_not_found")
        if not r.prompt_ids or len(r.prompt_ids) >= self.context:
            raise InvalidRequest(f"a prompt of {len(r.prompt_ids)} tokens does not fit the context of "
                                 f"{self.context} tokens with room to answer", param="messages",
                                 code="context_length_exceeded")

    def row(self, r: GenRequest, rid: str = "") -> _Row:
        import torch

        seed = r.params.seed if r.params.seed is not None else int(torch.randint(0, 2**62, (1,)))
        return _Row(r, self.tokenizer, self.eos_ids, self.context, torch.Generator().manual_seed(seed), rid)

    def _forward(self, rows: Sequence[_Row], ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:
        """One forward pass: the last position's logits (B, vocab) on the device, and the cache."""
        import torch

        kwargs: dict[str, Any] = {}
        if self.peft is not None:
            kwargs["adapter_names"] = [r.req.adapter or BASE for r in rows]
        with self.lock, torch.inference_mode():
            model = self.peft if self.peft is not None else self.model
            out = model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=pos.to(self.device),
                        past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[:, -1, :], out.past_key_values

    def _advance(self, rows: Sequence[_Row], logits: torch.Tensor) -> list[Delta | None]:
        """Sample each live row's next token (greedy rows in one argmax on the device) and push it; None for a row
        already done."""
        import torch

        greedy = torch.argmax(logits, dim=-1).tolist()  # (B,): one transfer for the whole batch
        events: list[Delta | None] = []
        for b, row in enumerate(rows):
            if row.done:
                events.append(None)
                row.last, row.pos = self.pad_id, row.pos + 1
                continue
            token = greedy[b] if row.req.params.temperature == 0 else row.sample(logits[b].float().cpu())
            ev = row.push(token)
            ev.batch = len(rows)
            events.append(ev)
            row.last, row.pos = (self.pad_id if row.done else token), row.pos + 1
        return events

    def prefill(self, rows: Sequence[_Row]) -> tuple[_Batch, list[Delta | None]]:
        """Run the rows' prompts (left-padded into one batch); each row's first token."""
        import torch

        B, L = len(rows), max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding: every row's last prompt token is at position L - 1
            n = len(r.req.prompt_ids)
            ids[b, L - n:] = torch.tensor(r.req.prompt_ids)
            mask[b, L - n:] = 1
            r.pos = n - 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        mask = mask.to(self.device)
        logits, cache = self._forward(rows, ids, mask, pos, None)
        return _Batch(list(rows), cache, mask), self._advance(rows, logits)

    def decode(self, batch: _Batch) -> list[Delta | None]:
        """One step of every row of the batch (rows already done step a pad token)."""
        import torch

        ids = torch.tensor([[r.last] for r in batch.rows], dtype=torch.long)
        pos = torch.tensor([[r.pos] for r in batch.rows], dtype=torch.long)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        logits, batch.cache = self._forward(batch.rows, ids, batch.mask, pos, batch.cache)
        return self._advance(batch.rows, logits)

    # --- one static batch, synchronously ----------------------------------------------------------------------------

    def stream(self, requests: Sequence[GenRequest]) -> Iterator[list[Delta | None]]:
        """Decode a batch; each step yields one entry per request: its Delta, or None once it has finished."""
        if not requests:
            return
        for r in requests:
            self.check(r)
        rows = [self.row(r) for r in requests]
        batch, events = self.prefill(rows)
        yield events
        while not all(row.done for row in rows):
            yield self.decode(batch)

    def generate(self, requests: Sequence[GenRequest]) -> list[Completion]:
        """Decode a batch to the end."""
        texts = [""] * len(requests)
        out: list[Completion | None] = [None] * len(requests)
        for events in self.stream(requests):
            for i, ev in enumerate(events):
                if ev is None:
                    continue
                texts[i] += ev.text
                if ev.finish_reason:
                    out[i] = Completion(texts[i], ev.finish_reason, len(requests[i].prompt_ids), ev.completion_tokens)
        return [c for c in out if c is not None]


# --- the engine -------------------------------------------------------------------------------------------------------

_END = None  # put on a request's queue when it was cancelled: its stream ends without a last delta


@dataclass
class _Request:
    """A request of the engine: its row, and the queue (on the caller's event loop) its deltas go to."""

    row: _Row
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | BaseException | None]

    def put(self, item: Delta | BaseException | None) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class HFEngine:
    """The ``hf`` engine (``serving.engine.Engine``): one decode loop, on its own thread, over a ``Decoder``.

    ``mode`` continuous or static (the module's docstring); at most ``max_batch_size`` rows decode together, the
    other requests wait (first come, first served). When the loop is idle, a new batch waits up to
    ``batch_wait_s`` for more requests to prefill with it.

    ``max_wait_s`` bounds the queue in seconds, not requests: a request that would wait longer than that for a
    slot is refused at once (``Overloaded``, a 429). Its wait is the requests ahead of it that must finish first,
    each taking ``max_batch_size``-th of a request's decode time: the recent seconds per step (wall time, so a
    step slowed by other work on the machine counts at once) x the recent tokens per request. So is a request
    whose wait and own decode time would pass its ``deadline`` (the caller's: what retrieval and the queues
    before the engine spent counts), which would otherwise decode for nothing and time out.
    """

    def __init__(self, decoder: Decoder, *, name: str = "", mode: Literal["continuous", "static"] = "continuous",
                 max_batch_size: int = 8, batch_wait_s: float = 0.0, max_wait_s: float | None = None):
        if mode == "continuous" and not decoder.mergeable():
            raise RagtuneError("generator.decoding = continuous: this model's KV cache has layers other than full "
                               "attention (e.g. sliding-window ones), whose rows the hf engine cannot merge. Fix: "
                               "generator.decoding: static", param="generator.decoding")
        self.decoder, self.name, self.mode = decoder, name, mode
        self.max_batch_size, self.batch_wait_s, self.max_wait_s = max_batch_size, batch_wait_s, max_wait_s
        self.step_s: float | None = None  # moving averages: wall seconds per step, tokens per finished request
        self.tokens: float | None = None
        self.cond = threading.Condition()
        self.requests: dict[str, _Request] = {}  # waiting or running
        self.waiting: deque[_Request] = deque()
        self.cancelled: set[str] = set()
        self.removing: set[str] = set()  # adapters to unload once no request uses them
        self.batch: _Batch | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="hf-decode", daemon=True)
        self.thread.start()

    @classmethod
    def load(cls, cfg: GeneratorConfig, resources: ReplicaResources, max_wait_s: float | None = None) -> HFEngine:
        decoder = Decoder.load(cfg.model, resources.device, cfg.dtype, cfg.context, resources.threads)
        return cls(decoder, name=cfg.model, mode=cfg.decoding, max_batch_size=cfg.max_batch_size if cfg.batching
                   else 1, batch_wait_s=cfg.batch_wait_timeout_s, max_wait_s=max_wait_s)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.decoder.tokenizer

    @property
    def context(self) -> int:
        return self.decoder.context

    # --- requests -------------------------------------------------------------------------------------------------

    def generate(self, request: GenRequest, request_id: str) -> AsyncGenerator[Delta, None]:
        """The request's deltas as they are decoded; closing this generator cancels the request. The request is
        checked and queued now: one that cannot run, or would wait past ``max_wait_s``, raises here, before the
        caller has sent anything."""
        self.decoder.check(request)
        req = _Request(self.decoder.row(request, request_id), asyncio.get_running_loop(), asyncio.Queue())
        with self.cond:
            if self.closed:
                raise Unavailable("the generation engine is closed; retry on another replica", code="engine_closed")
            if request_id in self.requests:
                raise Conflict(f"request id {request_id!r} is already running", code="duplicate_request_id")
            wait = self._wait_s()
            if self.max_wait_s is not None and wait > self.max_wait_s:
                raise Overloaded(f"the generation queue would keep this request waiting about {wait:.1f}s for a "
                                 f"slot ({len(self.waiting)} waiting, {self.max_batch_size} decoding), over the "
                                 f"{self.max_wait_s:g}s target (limits.latency_target_share x "
                                 "limits.request_timeout_s); retry after Retry-After seconds",
                                 code="rate_limit_exceeded")
            if request.deadline is not None:
                left, own = request.deadline - time.time(), self._decode_s(request.params.max_tokens)
                if wait + own > left:
                    raise Overloaded(f"this request would not finish before its deadline: about {wait:.1f}s "
                                     f"waiting for a slot and {own:.1f}s decoding, with {max(left, 0.0):.1f}s left "
                                     "of limits.request_timeout_s (retrieval and the queues before this engine "
                                     "took the rest); retry after Retry-After seconds", code="rate_limit_exceeded")
            self.requests[request_id] = req
            self.waiting.append(req)
            self.cond.notify()
        return self._deltas(req, request_id)

    def _wait_s(self) -> float:
        """Under the lock: the seconds a request queued now would wait for a slot (0 while one is free, or before
        a step and a request were measured)."""
        running = sum(not r.done for r in self.batch.rows) if self.batch is not None else 0
        ahead = len(self.waiting) + running - self.max_batch_size + 1  # requests that must finish before it starts
        if ahead <= 0 or self.step_s is None or self.tokens is None:
            return 0.0
        return ahead * self.tokens * self.step_s / self.max_batch_size

    def _decode_s(self, max_tokens: int) -> float:
        """The seconds a request decodes once it has a slot: its expected tokens (the recent mean, at most its
        ``max_tokens``) x the recent seconds per step; 0 before both were measured."""
        if self.step_s is None or self.tokens is None:
            return 0.0
        return min(self.tokens, max_tokens) * self.step_s

    async def _deltas(self, req: _Request, request_id: str) -> AsyncGenerator[Delta, None]:
        finished = False
        try:
            while True:
                item = await req.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._cancel(request_id)

    def _cancel(self, request_id: str) -> None:
        with self.cond:
            if request_id in self.requests:
                self.cancelled.add(request_id)
                self.cond.notify()

    async def cancel(self, request_id: str) -> None:
        self._cancel(request_id)

    # --- adapters -------------------------------------------------------------------------------------------------

    async def add_adapter(self, name: str, path: str) -> None:
        with self.cond:
            self.removing.discard(name)
        await asyncio.to_thread(self.decoder.add_adapter, name, path)

    async def remove_adapter(self, name: str) -> None:
        """Unload ``name`` now, or when the last request using it ends."""
        with self.cond:
            if any(r.row.req.adapter == name for r in self.requests.values()):
                self.removing.add(name)
                return
        await asyncio.to_thread(self.decoder.remove_adapter, name)

    def info(self) -> EngineInfo:
        with self.cond:
            running = len(self.batch.rows) if self.batch is not None else 0
            return EngineInfo(engine="hf", model=self.name, context=self.context, device=str(self.decoder.device),
                              adapters=self.decoder.adapters, mode=self.mode, max_batch_size=self.max_batch_size,
                              running=running, waiting=len(self.waiting))

    async def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        await asyncio.to_thread(self.thread.join)
        with self.cond:
            for req in self.requests.values():
                req.put(Unavailable("the generation engine was closed; retry", code="engine_closed"))
            self.requests.clear()
            self.waiting.clear()

    # --- the decode loop (its own thread) ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and self.batch is None:
                    self.cond.wait()
                if self.closed:
                    return
                if self.batch is None and self.batch_wait_s:  # idle: let a batch fill
                    self.cond.wait_for(lambda: self.closed or len(self.waiting) >= self.max_batch_size,
                                       self.batch_wait_s)
                admit = self._admit()
            try:
                t0 = time.perf_counter()
                self._step(admit)
                step_s = time.perf_counter() - t0
                with self.cond:
                    self.step_s = step_s if self.step_s is None else 0.8 * self.step_s + 0.2 * step_s
            except Exception as e:  # e.g. out of memory: every request of the step fails, the engine goes on
                log.exception("decode step failed")
                rows = [*(self.batch.rows if self.batch is not None else []), *admit]
                self.batch = None
                with self.cond:
                    for row in rows:
                        req = self.requests.pop(row.rid, None)
                        if req is not None:
                            req.put(e)
                    self._unload_unused()

    def _admit(self) -> list[_Row]:
        """Under the lock: apply cancels; the waiting requests that start now."""
        for rid in self.cancelled:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            req.row.done = True
            if req in self.waiting:
                self.waiting.remove(req)
            req.put(_END)
        self.cancelled.clear()
        if self.batch is not None and self.mode == "static":
            return []
        free = self.max_batch_size - (len(self.batch.rows) if self.batch is not None else 0)
        admit = []
        while self.waiting and free > 0:
            admit.append(self.waiting.popleft().row)
            free -= 1
        return admit

    def _step(self, admit: list[_Row]) -> None:
        """Prefill the newcomers and merge them in; one decode step of the batch; drop the rows that are done."""
        if self.batch is not None and self.mode == "continuous":
            self.batch = self._drop_done(self.batch)  # cancelled since the last step
        if admit:
            new, events = self.decoder.prefill(admit)
            self._deliver(new.rows, events)
            if self.mode == "static":
                self.batch = new
            elif (joined := self._drop_done(new)) is not None:  # rows done at their first token never join
                self.batch = joined if self.batch is None else merge_batches(self.batch, joined)
        if self.batch is not None and self.batch.rows and not all(r.done for r in self.batch.rows):
            self._deliver(self.batch.rows, self.decoder.decode(self.batch))
        if self.batch is not None:
            if self.mode == "continuous":
                self.batch = self._drop_done(self.batch)
            elif all(r.done for r in self.batch.rows):
                self.batch = None
        if self.batch is not None and not self.batch.rows:
            self.batch = None

    def _drop_done(self, batch: _Batch) -> _Batch | None:
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        if len(keep) == len(batch.rows):
            return batch
        return keep_rows(batch, keep) if keep else None

    def _deliver(self, rows: Sequence[_Row], events: Sequence[Delta | None]) -> None:
        with self.cond:
            for row, ev in zip(rows, events, strict=True):
                req = self.requests.get(row.rid)
                if ev is None or req is None:
                    continue
                req.put(ev)
                if ev.finish_reason:
                    del self.requests[row.rid]
                    n = ev.completion_tokens
                    self.tokens = n if self.tokens is None else 0.9 * self.tokens + 0.1 * n
            self._unload_unused()

    def _unload_unused(self) -> None:
        """Under the lock: unload the adapters marked for removal that no request uses any more."""
        used = {r.row.req.adapter for r in self.requests.values()}
        for name in list(self.removing - used):
            self.removing.discard(name)
            self.decoder.remove_adapter(name)
