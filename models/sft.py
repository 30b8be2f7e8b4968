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


@dataclass(frozen=True)
class Block:
    """Examples packed into one row: each keeps its own positions (0, 1, ...), so each attends only to itself."""

    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss does not count, and on the first token of every example
    position_ids: list[int]  # restart at 0 where an example starts: the boundaries the attention mask follows


def pack(examples: Iterable[Example], block: int) -> list[Block]:
    """Pack examples whole into blocks of at most ``block`` tokens, best fit decreasing; nothing is dropped.

    An example is never split across blocks (its tail would lose its prompt), and no block mixes examples in
    attention: the position ids restart at every example, which transformers turns into a block-diagonal causal
    mask (sdpa, eager) or variable-length sequences (flash-attention). The first token of every example gets label
    IGNORE, so the last token of one example does not predict the first of the next. Examples longer than
    ``block`` are cut to it.
    """
    sizes: list[int] = []  # tokens in each open block
    members: list[list[Example]] = []
    # longest first, and the fullest block it fits in: blocks come out nearly full (ties keep the input order)
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        e = Example(e.input_ids[:block], e.labels[:block])
        fits = [j for j, n in enumerate(sizes) if n + len(e.input_ids) <= block]
        if fits:
            j = max(fits, key=lambda j: sizes[j])
            sizes[j] += len(e.input_ids)
            members[j].append(e)
        else:
            sizes.append(len(e.input_ids))
            members.append([e])
    return [Block(input_ids=[t for e in m for t in e.input_ids],
                  labels=[x for e in m for x in [IGNORE, *e.labels[1:]]],
                  position_ids=[p for e in m for p in range(len(e.input_ids))]) for m in members]


def pad_blocks(blocks: Sequence[Block], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad packed blocks to the longest: input_ids, labels (IGNORE on padding), position_ids.

    No attention mask: transformers builds it from the position ids. The padding is one more sequence of its own
    (positions 0, 1, ...), which no example attends to.
    """
    n = max(len(b.input_ids) for b in blocks)
    return {
        "input_ids": [b.input_ids + [pad_id] * (n - len(b.input_ids)) for b in blocks],
        "labels": [b.labels + [IGNORE] * (n - len(b.labels)) for b in blocks],
        "position_ids": [b.position_ids + list(range(n - len(b.position_ids))) for b in blocks],
    }


def flatten_blocks(blocks: Sequence[Block]) -> dict[str, list[list[int]]]:
    """Packed blocks as one row without padding (transformers' padding-free format, as its
    DataCollatorWithFlattening makes): what flash-attention needs to see the sequences, from the position ids."""
    return {k: [[x for b in blocks for x in getattr(b, k)]] for k in ("input_ids", "labels", "position_ids")}
