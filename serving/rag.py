"""The answering path, one set of functions: retrieve -> build the prompt -> generate.

The Serve deployments call these functions (the ShardSearchers: ``group_rankings``; the Retriever:
``resolve_mode``, ``search_k``, ``combine``, ``passages_from``; the Generator:
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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.schemas import ApiError
from sharding.filters import matches, metadata_of

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


# --- search modes: dense, lexical, hybrid -----------------------------------------------------------------------------
#
# A shard group (a ShardSearcher, or the whole index in one process) answers with its *rankings*: dense (FAISS,
# ``ShardedIndex.search``) and/or lexical (BM25, ``ShardedIndex.search_lexical``), each ``ranking_depth`` deep.
# ``combine`` merges each ranking across groups (``merge_topk``) and, for hybrid, fuses them
# (``sharding.search.fuse``): exactly ``sharding.search.search(index, xq, texts, kk, mode, fusion)`` over all shards.

RANKINGS = {"dense": ("dense",), "lexical": ("lexical",), "hybrid": ("dense", "lexical")}


def resolve_mode(mode: str, manifest: Any, where: str, field: str = "mode") -> str:
    """The search mode for one index version: ``auto`` = hybrid when the version has a lexical part, else dense.

    Raises:
        ApiError: 400 ``lexical_unavailable`` when lexical or hybrid is asked of a version without a lexical part
        (callers that check a config turn it into a RagtuneError or a 409).
    """
    has_lexical = manifest.lexical is not None
    if mode == "auto":
        return "hybrid" if has_lexical else "dense"
    if mode not in RANKINGS:
        raise ApiError(400, f"{field} = {mode!r} is not a search mode. Fix: use one of auto, dense, lexical, hybrid",
                       param=field, code="invalid_mode")
    if mode != "dense" and not has_lexical:
        raise ApiError(400, f"{field} = {mode!r} needs a lexical (BM25) part, but index version {where} has none "
                            "(built with index.lexical.enabled false, or before hybrid search existed). Fix: use mode "
                            "dense or auto, or rebuild the index with `ragtune index`",
                       param=field, code="lexical_unavailable")
    return mode


def make_fusion(base: Any, overrides: Mapping[str, Any] | None = None) -> Any:
    """``sharding.search.Fusion`` from ``retrieval.fusion`` (a FusionConfig or a mapping) and a request's overrides."""
    from dataclasses import asdict, is_dataclass

    from sharding.search import Fusion

    if base is None:
        values: dict[str, Any] = {}
    elif isinstance(base, Mapping):
        values = dict(base)
    elif is_dataclass(base) and not isinstance(base, type):
        values = asdict(base)
    else:
        values = base.model_dump()
    return Fusion(**{**values, **(overrides or {})})


def ranking_depth(mode: str, kk: int, fusion: Any) -> int:
    """How deep each ranking is searched for ``kk`` results: ``kk``, or ``max(kk, fusion.depth)`` for hybrid."""
    return max(kk, fusion.depth) if mode == "hybrid" else kk


def group_rankings(index: Any, xq: np.ndarray | None, texts: Sequence[str] | None, depth: int,
                   rankings: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One shard group's rankings ({"dense" | "lexical": (D, I)}, each (nq, depth)) of an opened index version."""
    out = {}
    for r in rankings:
        if r == "dense":
            assert xq is not None, "dense ranking without query vectors"
            out[r] = index.search(xq, depth)
        else:
            assert texts is not None, "lexical ranking without query texts"
            out[r] = index.search_lexical(list(texts), depth)
    return out


def combine(groups: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]], mode: str, kk: int, metric: str,
            fusion: Any) -> tuple[np.ndarray, np.ndarray]:
    """The top-``kk`` (D, I) of a search in ``mode`` from every group's rankings: each ranking merged across groups
    (dense by the index's ``metric``, BM25 as inner product), then fused for hybrid."""
    from sharding.search import fuse, merge_topk

    depth = ranking_depth(mode, kk, fusion)
    merged = {}
    for r in RANKINGS[mode]:
        merged[r] = merge_topk([g[r][0] for g in groups], [g[r][1] for g in groups], depth,
                               metric if r == "dense" else "inner_product")
    if mode != "hybrid":
        return merged[mode]
    return fuse(merged["dense"], merged["lexical"], kk, metric, fusion)


class LocalRetriever:
    """Retrieval in one process: the index version LATEST names, its embedding model and docstore.

    The whole index is one shard group: the same ``group_rankings`` and ``combine`` as the Serve app's
    ShardSearchers and Retriever, the same filter widening.
    """

    def __init__(self, path: str, *, params: dict[str, int] | None = None, verify: bool = True, mmap: bool = True,
                 overfetch: int = 10, max_candidates: int = 10_000, mode: str = "auto", fusion: Any = None):
        from configs.errors import RagtuneError
        from sharding.search import ShardedIndex

        self.index = ShardedIndex.open(path, verify=verify, mmap=mmap, params=params)
        self.docstore = self.index.docstore()
        self.overfetch, self.max_candidates = overfetch, max_candidates
        try:
            resolved = resolve_mode(mode, self.index.manifest, self.index.location.uri, "retrieval.mode")
        except ApiError as e:
            raise RagtuneError(e.message) from None
        self.mode, self.fusion = mode, make_fusion(fusion)
        if resolved != "dense":
            self.index.lexical_shards()  # load (and check) the BM25 shards now, not in the first request
        self.encoder: Any = None if resolved == "lexical" else self._load_encoder()  # lexical needs no model

    def _load_encoder(self) -> Any:
        from models.embedders import QueryEncoder

        return QueryEncoder(self.index.manifest)

    def search(self, query: str, k: int, filter: Mapping[str, Any] | None = None, mode: str | None = None,
               fusion: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """The top ``k`` passages; ``mode`` and ``fusion`` (overrides) as a request gives them (None: as built)."""
        mode = resolve_mode(mode or self.mode, self.index.manifest, self.index.location.uri)
        fused = make_fusion(self.fusion, fusion)
        if mode != "lexical" and self.encoder is None:  # a dense request to a retriever built lexical-only
            self.encoder = self._load_encoder()
        xq = None if mode == "lexical" else self.encoder.encode([query])
        kk: int | None = search_k(k, filter, self.index.ntotal, self.overfetch)
        passages: list[dict[str, Any]] = []
        while kk is not None:
            rankings = group_rankings(self.index, xq, [query], ranking_depth(mode, kk, fused), RANKINGS[mode])
            D, I = combine([rankings], mode, kk, self.index.manifest.metric, fused)
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
        r = cfg.retrieval
        self.retriever = LocalRetriever(cfg.index.path, params=cfg.index.params, verify=cfg.index.verify,
                                        mmap=cfg.index.mmap, overfetch=r.filter_overfetch,
                                        max_candidates=r.filter_max_candidates, mode=r.mode, fusion=r.fusion)
        g = cfg.generator
        self.decoder = Decoder.load(g.model, g.device, g.dtype, g.context, g.threads)
        for name, path in g.adapters.items():
            self.decoder.add_adapter(name, path)

    def answer(self, messages: Sequence[Mapping[str, str]], *, model: str | None = None, retrieval: bool = True,
               k: int | None = None, filter: Mapping[str, Any] | None = None, mode: str | None = None,
               fusion: Mapping[str, Any] | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
               seed: int | None = None) -> dict[str, Any]:
        """Answer the last user message: {"text", "finish_reason", "citations", "usage"}. ``retrieval``, ``k``,
        ``filter``, ``mode`` and ``fusion`` as a chat request's ``retrieval`` extension gives them."""
        from serving.generation import GenRequest

        g = self.cfg.generator
        model = model or g.name
        if model != g.name and model not in g.adapters:
            raise ApiError(404, f"model {model!r} is not served (models: {[g.name, *g.adapters]})", param="model",
                           code="model_not_found")
        passages = self.retriever.search(messages[-1]["content"], k or self.cfg.retrieval.k, filter, mode, fusion) \
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
