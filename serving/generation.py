"""Batched generation with a transformers causal LM, pure of Serve (the Generator deployment and in-process
answering both run it).

One decode loop serves a batch of requests that each have their own prompt, token budget, sampling (greedy,
temperature, top-p, seed), stop sequences and LoRA adapter. Prompts are left-padded into one (B, L) batch with
position ids from the attention mask; each step feeds one token per row through the KV cache. Rows that finish
early keep stepping with a pad token (their output is ignored) until the whole batch is done: simple, and on a
small batch cheaper than re-packing the cache. Adapters are loaded into one ``peft.PeftModel`` over the shared
base and chosen per row with PEFT's ``adapter_names`` (``"__base__"`` = no adapter), so one batch can mix them.

Text is streamed as it is decoded: each step yields, per request, the text that is now certain (a trailing
incomplete UTF-8 character, or the start of a possible stop sequence, is held back until the next step).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from configs.errors import RagtuneError
from models.generators import load_model, load_tokenizer, local_model_dir
from models.hardware import resolve_device

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    """One sequence to continue: prompt token ids, sampling, and the adapter (None = the base model)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None


@dataclass
class Delta:
    """New text of one request after a step; ``finish_reason`` is set on its last delta (stop | length)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


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
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    done: bool = False

    def sample(self, logits: torch.Tensor) -> int:
        import torch

        p = self.req.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
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


class Decoder:
    """A causal LM, its tokenizer and LoRA adapters, ready for batched, streamed generation.

    One forward pass runs at a time (a lock): PEFT selects adapters per row through hooks registered for the
    duration of a forward call, which two concurrent calls would mix up. Batches interleave step by step.
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
        with self.lock:
            if self.peft is not None and name in self.peft.peft_config:
                self.peft.delete_adapter(name)

    # --- generation -----------------------------------------------------------------------------------------------

    def stream(self, requests: Sequence[GenRequest]) -> Iterator[list[Delta | None]]:
        """Decode a batch; each step yields one entry per request: its Delta, or None once it has finished."""
        import torch

        if not requests:
            return
        for r in requests:
            if r.adapter is not None and r.adapter not in self.adapters:
                raise RagtuneError(f"adapter {r.adapter!r} is not loaded (loaded: {self.adapters})")
            if not r.prompt_ids or len(r.prompt_ids) >= self.context:
                raise RagtuneError(f"a prompt of {len(r.prompt_ids)} tokens does not fit the context of "
                                   f"{self.context} tokens with room to answer")
        rows = []
        for r in requests:
            rng = torch.Generator().manual_seed(r.params.seed if r.params.seed is not None else
                                                int(torch.randint(0, 2**62, (1,))))
            rows.append(_Row(r, self.tokenizer, self.eos_ids, self.context, rng))
        B, L = len(requests), max(len(r.prompt_ids) for r in requests)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, r in enumerate(requests):  # left padding: every row's last prompt token is at position L - 1
            ids[b, L - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[b, L - len(r.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if self.peft is not None:
            kwargs["adapter_names"] = [r.adapter or BASE for r in requests]
        model = self.peft if self.peft is not None else self.model
        past = None
        step_ids, step_pos = ids, pos
        while True:
            with self.lock, torch.inference_mode():
                out = model(input_ids=step_ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=step_pos.to(self.device), past_key_values=past, use_cache=True, **kwargs)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float().cpu()  # (B, vocab)
            events: list[Delta | None] = []
            nxt = []
            for b, row in enumerate(rows):
                if row.done:
                    events.append(None)
                    nxt.append(self.pad_id)
                    continue
                token = row.sample(logits[b])
                events.append(row.push(token))
                nxt.append(self.pad_id if row.done else token)
            yield events
            if all(row.done for row in rows):
                return
            step_ids = torch.tensor(nxt, dtype=torch.long)[:, None]
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
            step_pos = step_pos[:, -1:] + 1

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
