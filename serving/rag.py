"""The answering path, one set of functions: retrieve -> build the prompt -> generate.

The Serve deployments call these functions (the Retriever: ``search_k``, ``passages_from``; the Generator:
``build_prompt``, ``sampling_params`` and ``serving.generation``), and :class:`RagPipeline` chains the same
functions in one process without Serve (``ragtune ask --in-process``, the compare job), so what is measured is
what is served (DESIGN.md).

Prompt assembly: with retrieval, the passages are numbered ``[1]..[k]`` in rank order and put with the question
into the last user message (``prompt.context``), after a system message (``prompt.system``) when the request has
none; the tokenizer's chat template then renders the conversation. When the prompt and ``max_tokens`` do not fit
the model's context, older turns go first, then passages are cut from the lowest rank up (a passage that would
keep fewer than ``prompt.min_passage_tokens`` is dropped); a question that does not fit alone is a 400.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.schemas import ApiError, Scalar

if TYPE_CHECKING:
    from configs.schema.serve import GenerationDefaults, PromptConfig, ServeJobConfig
    from serving.generation import SamplingParams

log = logging.getLogger("ragtune.serve")

PASSAGE_FIELDS = ("doc_id", "title", "text", "metadata")


# --- retrieval --------------------------------------------------------------------------------------------------------

def search_k(k: int, filter: Mapping[str, Any] | None, ntotal: int, overfetch: int) -> int:
    """Candidates to search for ``k`` results: ``k``, or ``k x overfetch`` when a filter will drop some."""
    want = k * overfetch if filter else k
    return max(k, min(want, ntotal)) if ntotal else k


def widen_k(kk: int, k: int, found: int, filter: Mapping[str, Any] | None, ntotal: int,
            max_candidates: int) -> int | None:
    """The next candidate count when a filter left fewer than ``k`` of ``kk`` candidates, or None: enough passed,
    no filter, every vector was a candidate already, or ``max_candidates`` was reached."""
    limit = min(ntotal, max(max_candidates, k))
    if not filter or found >= k or kk >= limit:
        return None
    return min(kk * 4, limit)


def metadata_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The chunk's metadata as a dict (the docstore keeps it as JSON text)."""
    meta = row.get("metadata")
    if isinstance(meta, dict):
        return meta
    try:
        value = json.loads(meta) if meta else {}
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def matches(row: Mapping[str, Any], filter: Mapping[str, Scalar | list[Scalar]]) -> bool:
    """Equality filter: every key must hold the value (or one of a list of values). ``doc_id`` and ``title``
    are the docstore's columns; any other key is looked up in the chunk's metadata."""
    meta = metadata_of(row)
    for key, want in filter.items():
        value = row.get(key) if key in ("doc_id", "title") else meta.get(key)
        if value not in (want if isinstance(want, list) else [want]):
            return False
    return True


def passages_from(d: np.ndarray, i: np.ndarray, docstore: Any, k: int,
                  filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The top ``k`` passages of one query's merged results (a row of D and I): rank, score, chunk_id, doc_id,
    title, text, metadata; with a filter, only rows that pass it, re-ranked 1..k."""
    from sharding.search import ranked_hits

    rows = docstore.lookup(np.asarray(i)[np.asarray(i) >= 0], columns=list(PASSAGE_FIELDS))
    hits = ranked_hits(d, i, rows, PASSAGE_FIELDS)
    if filter:
        hits = [h for h in hits if matches(h, filter)]
    out = []
    for rank, h in enumerate(hits[:k], 1):
        out.append({**h, "rank": rank, "metadata": metadata_of(h)})
    return out


class LocalRetriever:
    """Retrieval in one process: the index version LATEST names, its embedding model and docstore."""

    def __init__(self, path: str, *, params: dict[str, int] | None = None, verify: bool = True, mmap: bool = True,
                 overfetch: int = 10, max_candidates: int = 10_000):
        from models.embedders import QueryEncoder
        from sharding.search import ShardedIndex

        self.index = ShardedIndex.open(path, verify=verify, mmap=mmap, params=params)
        self.encoder = QueryEncoder(self.index.manifest)
        self.docstore = self.index.docstore()
        self.overfetch, self.max_candidates = overfetch, max_candidates

    def search(self, query: str, k: int, filter: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        xq = self.encoder.encode([query])
        kk: int | None = search_k(k, filter, self.index.ntotal, self.overfetch)
        passages: list[dict[str, Any]] = []
        while kk is not None:
            D, I = self.index.search(xq, kk)
            passages = passages_from(D[0], I[0], self.docstore, k, filter)
            kk = widen_k(kk, k, len(passages), filter, self.index.ntotal, self.max_candidates)
        return passages


# --- prompt -----------------------------------------------------------------------------------------------------------

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
        ApiError: 400 ``context_length_exceeded`` when even the question alone does not fit.
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
        raise ApiError(400, f"the prompt needs {len(ids)} tokens and max_tokens is {max_tokens}, but the model's "
                            f"context is {context} tokens. Shorten the messages or lower max_tokens.",
                       param="messages", code="context_length_exceeded")


def completion_prompt(tokenizer: Any, prompt: str, context: int, max_tokens: int) -> list[int]:
    """Token ids of a raw completion prompt; a 400 when it and ``max_tokens`` do not fit the context."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, but the model's "
                            f"context is {context} tokens.", param="prompt", code="context_length_exceeded")
    return ids


def sampling_params(defaults: GenerationDefaults, *, max_tokens: int | None, temperature: float | None,
                    top_p: float | None, stop: Sequence[str] = (), seed: int | None = None) -> SamplingParams:
    """A request's sampling, its missing values taken from ``generator.defaults``."""
    from serving.generation import SamplingParams

    return SamplingParams(max_tokens=max_tokens or defaults.max_tokens,
                          temperature=defaults.temperature if temperature is None else temperature,
                          top_p=defaults.top_p if top_p is None else top_p, stop=tuple(stop), seed=seed)


def citation(p: Mapping[str, Any]) -> dict[str, Any]:
    """A passage as the API returns it (``citations``)."""
    return {"n": p.get("n"), "rank": p["rank"], "score": p["score"], "chunk_id": p["chunk_id"],
            "doc_id": p.get("doc_id"), "title": p.get("title"), "text": p.get("text"),
            "metadata": p.get("metadata") or {}, "truncated": bool(p.get("truncated", False))}


# --- in one process ---------------------------------------------------------------------------------------------------

class RagPipeline:
    """Retrieval and generation in this process, through the same functions the Serve app runs."""

    def __init__(self, cfg: ServeJobConfig):
        from serving.generation import Decoder

        self.cfg = cfg
        self.retriever = LocalRetriever(cfg.index.path, params=cfg.index.params, verify=cfg.index.verify,
                                        mmap=cfg.index.mmap, overfetch=cfg.retrieval.filter_overfetch,
                                        max_candidates=cfg.retrieval.filter_max_candidates)
        g = cfg.generator
        self.decoder = Decoder.load(g.model, g.device, g.dtype, g.context, g.threads)
        for name, path in g.adapters.items():
            self.decoder.add_adapter(name, path)

    def answer(self, messages: Sequence[Mapping[str, str]], *, model: str | None = None, retrieval: bool = True,
               k: int | None = None, filter: Mapping[str, Any] | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
               seed: int | None = None) -> dict[str, Any]:
        """Answer the last user message: {"text", "finish_reason", "citations", "usage"}."""
        from serving.generation import GenRequest

        g = self.cfg.generator
        model = model or g.name
        if model != g.name and model not in g.adapters:
            raise ApiError(404, f"model {model!r} is not served (models: {[g.name, *g.adapters]})", param="model",
                           code="model_not_found")
        passages = self.retriever.search(messages[-1]["content"], k or self.cfg.retrieval.k, filter) \
            if retrieval else []
        params = sampling_params(g.defaults, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 stop=stop, seed=seed)
        prompt = build_prompt(self.decoder.tokenizer, messages, passages, self.cfg.prompt, self.decoder.context,
                              params.max_tokens)
        [out] = self.decoder.generate([GenRequest(prompt.ids, params, None if model == g.name else model)])
        return {"text": out.text, "finish_reason": out.finish_reason,
                "citations": [citation(p) for p in prompt.passages],
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens}}
