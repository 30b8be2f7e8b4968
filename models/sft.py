"""Supervised fine-tuning records -> token ids and labels, with the loss masked to the answer tokens.

A record is either chat (``{"messages": [{"role": ..., "content": ...}, ...]}``) or a pair
(``{"prompt": ..., "completion": ...}``, treated as one user turn and one assistant turn). The tokenizer's chat
template renders it; every assistant turn is a label span and everything else is masked with -100, so the loss
is the answer tokens' only. Pure functions: the fine-tuning job and the compare job (RAFT records) share them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from configs.errors import RagtuneError

IGNORE = -100  # label of a token the loss does not count


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not count

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def to_messages(record: Mapping[str, Any], where: str = "record") -> list[dict[str, str]]:
    """The record as chat messages; a clear error naming the record when it has neither shape."""
    if "messages" in record and record["messages"] is not None:
        msgs = list(record["messages"])
        if not msgs or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in msgs):
            raise RagtuneError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
        if msgs[-1]["role"] != "assistant":
            raise RagtuneError(f"{where}: the last message must be the assistant's answer, got role "
                               f"{msgs[-1]['role']!r}")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": str(record["prompt"])},
                {"role": "assistant", "content": str(record["completion"])}]
    raise RagtuneError(f"{where}: needs `messages`, or `prompt` and `completion` (fields: {', '.join(record)}). "
                       "Fix: convert the data to one of the two shapes")


def _ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, Mapping) or hasattr(out, "keys"):  # transformers may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_len: int,
                where: str = "record") -> Example:
    """Render ``messages`` with the chat template; label every assistant turn, mask the rest; cut at max_len."""
    if not getattr(tokenizer, "chat_template", None):
        raise RagtuneError(f"the tokenizer of this model has no chat template, needed for {where}. Fix: use a "
                           "chat model, or set data.template: raw to train on prompt + completion text")
    input_ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _ids(tokenizer, messages[:i], generation_prompt=True)
        full = _ids(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(prefix)] != prefix or prefix[: len(input_ids)] != input_ids:
            raise RagtuneError(f"{where}: the chat template does not render turns as prefixes of each other, so "
                               "answer tokens cannot be located. Fix: use data.template: raw")
        labels += [IGNORE] * (len(prefix) - len(input_ids)) + full[len(prefix):]
        input_ids = full
    return Example(input_ids[:max_len], labels[:max_len])


def encode_raw(tokenizer: Any, prompt: str, completion: str, max_len: int) -> Example:
    """Plain text: prompt + completion + EOS, with the loss on the completion and EOS."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id, *p]
    return Example((p + c)[:max_len], ([IGNORE] * len(p) + c)[:max_len])


def encode_record(tokenizer: Any, record: Mapping[str, Any], max_len: int, template: str = "chat",
                  where: str = "record") -> Example:
    """One training record -> Example, by the chat template (``chat``) or as plain text (``raw``)."""
    messages = to_messages(record, where)
    if template == "raw":
        prompt = "\n".join(m["content"] for m in messages[:-1])
        return encode_raw(tokenizer, prompt, messages[-1]["content"], max_len)
    return encode_chat(tokenizer, messages, max_len, where)


def is_validation(key: str, fraction: float, seed: int) -> bool:
    """Whether a record goes to the validation split: a stable hash of its key, so every run splits alike."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def pad_batch(examples: Sequence[Example], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (IGNORE on padding)."""
    n = max(len(e.input_ids) for e in examples)
    return {
        "input_ids": [e.input_ids + [pad_id] * (n - len(e.input_ids)) for e in examples],
        "attention_mask": [[1] * len(e.input_ids) + [0] * (n - len(e.input_ids)) for e in examples],
        "labels": [e.labels + [IGNORE] * (n - len(e.labels)) for e in examples],
    }


def pack(examples: Iterable[Example], block: int) -> list[Example]:
    """Concatenate examples into blocks of exactly ``block`` tokens (the last, shorter one is dropped).

    Attention crosses example boundaries inside a block (plain packing); each example's labels keep their
    masking, so only answer tokens count. Fewer pad tokens, more tokens per step.
    """
    out: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= block:
            out.append(Example(ids[:block], labels[:block]))
            ids, labels = ids[block:], labels[block:]
    return out
