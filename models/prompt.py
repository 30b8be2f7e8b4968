"""The prompt a question is answered with: retrieved passages and the conversation, rendered through the model's
chat template and fitted to its context. Serving answers with it (``serving.rag``, the Generator) and RAFT trains
with it (``models.raft``), so that what is trained is what is served.

With passages, they are numbered ``[1]..[k]`` in rank order and put with the question into the last user message
(``prompt.context``), after a system message (``prompt.system``) when the conversation has none; the tokenizer's
chat template then renders the conversation. When the prompt and ``max_tokens`` do not fit the model's context,
older turns go first, then passages are cut from the lowest rank up (a passage that would keep fewer than
``prompt.min_passage_tokens`` is dropped); a question that does not fit alone is an ``InvalidRequest``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from configs.errors import InvalidRequest
from configs.schema.serve import PromptConfig


@dataclass
class Prompt:
    """A rendered prompt and what went into it."""

    ids: list[int]
    passages: list[dict[str, Any]]  # the passages in the prompt, numbered as cited (``n``); text possibly cut
    dropped_passages: int = 0
    dropped_turns: int = 0
    text: str = field(default="", repr=False)


def format_passages(passages: Sequence[Mapping[str, Any]], cfg: PromptConfig) -> str:
    return cfg.separator.join(
        cfg.passage.format(n=n, title=p.get("title") or "", text=p.get("text") or "", doc_id=p.get("doc_id") or "",
                           score=p.get("score", "")).strip()
        for n, p in enumerate(passages, 1))


def rag_messages(messages: Sequence[Mapping[str, str]], passages: Sequence[Mapping[str, Any]],
                 cfg: PromptConfig) -> list[dict[str, str]]:
    """The conversation with the passages and the question in the last user message (no change without passages)."""
    out = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not passages:
        return out
    if cfg.system and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": cfg.system})
    out[-1]["content"] = cfg.context.format(passages=format_passages(passages, cfg), question=out[-1]["content"])
    return out


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
    """The prompt text and ids through the tokenizer's chat template (a plain ``role: content`` layout without one).
    The template writes any special tokens itself, so none are added when tokenizing its text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]], passages: Sequence[Mapping[str, Any]],
                 cfg: PromptConfig, context: int, max_tokens: int) -> Prompt:
    """Render the prompt so that it and ``max_tokens`` new tokens fit ``context`` tokens.

    Older turns are dropped first (never a system message or the last user message), then the lowest-ranked
    passage is cut by tokens, or dropped when fewer than ``cfg.min_passage_tokens`` would remain, and so on.

    Raises:
        InvalidRequest: ``context_length_exceeded`` when even the question alone does not fit.
    """
    budget = context - max_tokens
    msgs = [dict(m) for m in messages]
    kept = [dict(p) for p in passages]
    dropped_turns = dropped_passages = 0
    while True:
        text, ids = render(tokenizer, rag_messages(msgs, kept, cfg))
        over = len(ids) - budget
        if over <= 0:
            return Prompt(ids, [{**p, "n": n} for n, p in enumerate(kept, 1)], dropped_passages, dropped_turns, text)
        old = next((j for j, m in enumerate(msgs[:-1]) if m["role"] != "system"), None)
        if old is not None:
            msgs.pop(old)
            dropped_turns += 1
            continue
        if kept:
            last = kept[-1]
            toks = tokenizer(last["text"], add_special_tokens=False)["input_ids"]
            keep = len(toks) - over - 2  # 2 tokens of margin: the cut text can tokenize differently at its end
            if keep >= cfg.min_passage_tokens:
                last["text"] = tokenizer.decode(toks[:keep], skip_special_tokens=True)
                last["truncated"] = True
            else:
                kept.pop()
                dropped_passages += 1
            continue
        raise InvalidRequest(f"the prompt needs {len(ids)} tokens and max_tokens is {max_tokens}, but the model's "
                             f"context is {context} tokens. Shorten the messages or lower max_tokens.",
                             param="messages", code="context_length_exceeded")


def completion_prompt(tokenizer: Any, prompt: str, context: int, max_tokens: int) -> list[int]:
    """Token ids of a raw completion prompt; a 400 when it and ``max_tokens`` do not fit the context."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) + max_tokens > context:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the model's "
                             f"context is {context} tokens.", param="prompt", code="context_length_exceeded")
    return ids
