"""The answering path, one set of functions: retrieve -> build the prompt -> generate.

The Serve deployments call these functions (the ShardSearchers: ``group_rankings``; the Retriever:
``resolve_mode``, ``search_k``, ``combine``, ``passages_from``; the fused IndexReplica: ``search_many`` over
batches of queries, and the same filter widening; the Ingress: ``sampling_params``; the Generator:
``rag_prompt`` and ``serving.generation``), and :class:`RagPipeline` chains the same functions in one process
without Serve (``ragtune ask --config``, the compare job), so what is measured is what is served.
The prompt itself, and how it is fitted to the model's context, is ``models.prompt``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from configs.errors import InvalidRequest, NotFound
from configs.schema.serve import FusionConfig, GenerationDefaults, PromptConfig, ServeJobConfig
from models.embedders import QueryEncoder
from models.prompt import Prompt, build_prompt
from serving.generation import Decoder, GenRequest, SamplingParams
from serving.schemas import Citation, Passage, Usage
from sharding.docstore import Docstore
from sharding.filters import Filter, matches, metadata_of
from sharding.manifest import IndexManifest
from sharding.search import Fusion, ShardedIndex, fuse, merge_topk, ranked_hits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("ragtune.serve")

PASSAGE_FIELDS = ("doc_id", "title", "text", "metadata")  # the docstore columns a Passage holds

Rankings = dict[str, tuple[np.ndarray, np.ndarray]]  # {"dense" | "lexical": (D, I)}, each (nq, depth)
FusionOverrides = Mapping[str, str | float]  # a request's values of some of Fusion's fields (method, weight, ...)


# --- retrieval --------------------------------------------------------------------------------------------------------

def search_k(k: int, filter: Filter | None, ntotal: int, overfetch: int) -> int:
    """Candidates to search for ``k`` results: ``k``, or ``k x overfetch`` when a filter will drop some."""
    want = k * overfetch if filter else k
    return max(k, min(want, ntotal)) if ntotal else k


def widen_k(kk: int, k: int, found: int, filter: Filter | None, ntotal: int,
            max_candidates: int) -> int | None:
    """The next candidate count when a filter left fewer than ``k`` of ``kk`` candidates, or None: enough passed,
    no filter, every vector was a candidate already, or ``max_candidates`` was reached."""
    limit = min(ntotal, max(max_candidates, k))
    if not filter or found >= k or kk >= limit:
        return None
    return min(kk * 4, limit)


def passages_from(d: np.ndarray, i: np.ndarray, docstore: Docstore, k: int,
                  filter: Filter | None = None) -> list[Passage]:
    """The top ``k`` passages of one query's merged results (a row of D and I); with a filter, only rows that pass
    it, re-ranked 1..k."""
    return passages_of(d, i, docstore.lookup(np.asarray(i)[np.asarray(i) >= 0], columns=list(PASSAGE_FIELDS)), k,
                       filter)


def passages_of(d: np.ndarray, i: np.ndarray, rows: dict[int, dict[str, Any]], k: int,
                filter: Filter | None = None) -> list[Passage]:
    """:func:`passages_from` with the docstore's ``rows`` read already (a superset of the row's ids will do: one
    read for a batch of queries)."""
    hits = ranked_hits(d, i, rows, PASSAGE_FIELDS)
    if filter:
        hits = [h for h in hits if matches(h, filter)]
    return [Passage(**{**h, "rank": rank, "metadata": metadata_of(h)}) for rank, h in enumerate(hits[:k], 1)]


# --- search modes: dense, lexical, hybrid -----------------------------------------------------------------------------
#
# A shard group (a ShardSearcher, or the whole index in one process) answers with its *rankings*: dense (FAISS,
# ``ShardedIndex.search``) and/or lexical (BM25, ``ShardedIndex.search_lexical``), each ``ranking_depth`` deep.
# ``combine`` merges each ranking across groups (``merge_topk``) and, for hybrid, fuses them
# (``sharding.search.fuse``): exactly ``sharding.search.search(index, xq, texts, kk, mode, fusion)`` over all shards.

RANKINGS = {"dense": ("dense",), "lexical": ("lexical",), "hybrid": ("dense", "lexical")}


def resolve_mode(mode: str, manifest: IndexManifest, where: str, field: str = "mode") -> str:
    """The search mode for one index version: ``auto`` = hybrid when the version has a lexical part, else dense.

    Raises:
        InvalidRequest: ``lexical_unavailable`` when lexical or hybrid is asked of a version without a lexical
        part (a request's 400; at start-up, the config's error; the Retriever's reload turns it into a Conflict).
    """
    has_lexical = manifest.lexical is not None
    if mode == "auto":
        return "hybrid" if has_lexical else "dense"
    if mode not in RANKINGS:
        raise InvalidRequest(f"{field} = {mode!r} is not a search mode. Fix: use one of auto, dense, lexical, hybrid",
                             param=field, code="invalid_mode")
    if mode != "dense" and not has_lexical:
        raise InvalidRequest(f"{field} = {mode!r} needs a lexical (BM25) part, but index version {where} has none "
                             "(its manifest lists no BM25 shards, e.g. built with index.lexical.enabled false). Fix: "
                             "use mode dense or auto, or rebuild the index with `ragtune index`",
                             param=field, code="lexical_unavailable")
    return mode


def make_fusion(base: FusionConfig | Fusion | None, overrides: FusionOverrides | None = None) -> Fusion:
    """``sharding.search.Fusion`` from ``retrieval.fusion`` (or a Fusion already made) and a request's overrides."""
    if base is None:
        values: dict[str, Any] = {}
    elif isinstance(base, Fusion):
        values = asdict(base)
    else:
        values = base.model_dump()
    return Fusion(**{**values, **(overrides or {})})


def ranking_depth(mode: str, kk: int, fusion: Fusion) -> int:
    """How deep each ranking is searched for ``kk`` results: ``kk``, or ``max(kk, fusion.depth)`` for hybrid."""
    return max(kk, fusion.depth) if mode == "hybrid" else kk


def group_rankings(index: ShardedIndex, xq: np.ndarray | None, texts: Sequence[str] | None, depth: int,
                   rankings: Sequence[str]) -> Rankings:
    """One shard group's rankings of an opened index version."""
    out = {}
    for r in rankings:
        if r == "dense":
            assert xq is not None, "dense ranking without query vectors"
            out[r] = index.search(xq, depth)
        else:
            assert texts is not None, "lexical ranking without query texts"
            out[r] = index.search_lexical(list(texts), depth)
    return out


def combine(groups: Sequence[Rankings], mode: str, kk: int, metric: str,
            fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """The top-``kk`` (D, I) of a search in ``mode`` from every group's rankings: each ranking merged across groups
    (dense by the index's ``metric``, BM25 as inner product), then fused for hybrid."""
    depth = ranking_depth(mode, kk, fusion)
    merged = {}
    for r in RANKINGS[mode]:
        merged[r] = merge_topk([g[r][0] for g in groups], [g[r][1] for g in groups], depth,
                               metric if r == "dense" else "inner_product")
    if mode != "hybrid":
        return merged[mode]
    return fuse(merged["dense"], merged["lexical"], kk, metric, fusion)


@dataclass(frozen=True)
class Query:
    """One query of a batch searched together (:func:`search_many`): its text, its mode as resolved (dense,
    lexical or hybrid), its candidate count ``kk`` (``search_k``, ``widen_k``) and its fusion."""

    text: str
    mode: str
    kk: int
    fusion: Fusion


def search_many(index: ShardedIndex, xq: np.ndarray | None, queries: Sequence[Query]) -> list[tuple[np.ndarray,
                                                                                                      np.ndarray]]:
    """The top-``kk`` (D, I) row of each query over the whole opened ``index``: the queries of one (mode, kk,
    fusion) go through one ``group_rankings`` call (one FAISS search of all their vectors, one BM25 search of all
    their texts) and one ``combine``. ``xq`` (nq, d): row n is query n's vector (any row for a lexical query;
    None when all are lexical). Query by query, exactly what ``group_rankings`` and ``combine`` give alone."""
    batches: dict[tuple[str, int, Fusion], list[int]] = {}
    for n, q in enumerate(queries):
        batches.setdefault((q.mode, q.kk, q.fusion), []).append(n)
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0))] * len(queries)
    for (mode, kk, fusion), rows in batches.items():
        vectors = None if mode == "lexical" or xq is None else xq[rows]
        rankings = group_rankings(index, vectors, [queries[r].text for r in rows], ranking_depth(mode, kk, fusion),
                                  RANKINGS[mode])
        D, I = combine([rankings], mode, kk, index.manifest.metric, fusion)
        for j, r in enumerate(rows):
            out[r] = (D[j], I[j])
    return out


class LocalRetriever:
    """Retrieval in one process: the index version LATEST names, its embedding model and docstore.

    The whole index is one shard group: the same ``group_rankings`` and ``combine`` as the Serve app's
    ShardSearchers and Retriever, the same filter widening.
    """

    def __init__(self, path: str, *, params: dict[str, int] | None = None, verify: bool = True, mmap: bool = True,
                 overfetch: int = 10, max_candidates: int = 10_000, mode: str = "auto",
                 fusion: FusionConfig | None = None):
        self.index = ShardedIndex.open(path, verify=verify, mmap=mmap, params=params)
        self.docstore = self.index.docstore()
        self.overfetch, self.max_candidates = overfetch, max_candidates
        resolved = resolve_mode(mode, self.index.manifest, self.index.location.uri, "retrieval.mode")
        self.mode, self.fusion = mode, make_fusion(fusion)
        if resolved != "dense":
            self.index.lexical_shards()  # load (and check) the BM25 shards now, not in the first request
        self.encoder: QueryEncoder | None = None if resolved == "lexical" else self._load_encoder()  # lexical: no model

    def _load_encoder(self) -> QueryEncoder:
        return QueryEncoder(self.index.manifest)

    def search(self, query: str, k: int, filter: Filter | None = None, mode: str | None = None,
               fusion: FusionOverrides | None = None) -> list[Passage]:
        """The top ``k`` passages; ``mode`` and ``fusion`` (overrides) as a request gives them (None: as built)."""
        mode = resolve_mode(mode or self.mode, self.index.manifest, self.index.location.uri)
        fused = make_fusion(self.fusion, fusion)
        xq = None
        if mode != "lexical":
            if self.encoder is None:  # a dense request to a retriever built lexical-only
                self.encoder = self._load_encoder()
            xq = self.encoder.encode([query])
        kk: int | None = search_k(k, filter, self.index.ntotal, self.overfetch)
        passages: list[Passage] = []
        while kk is not None:
            [(d, i)] = search_many(self.index, xq, [Query(query, mode, kk, fused)])
            passages = passages_from(d, i, self.docstore, k, filter)
            kk = widen_k(kk, k, len(passages), filter, self.index.ntotal, self.max_candidates)
        return passages


# --- prompt, sampling and citations ----------------------------------------------------------------------------------

def sampling_params(defaults: GenerationDefaults, *, max_tokens: int | None, temperature: float | None,
                    top_p: float | None, stop: Sequence[str] = (), seed: int | None = None) -> SamplingParams:
    """A request's sampling, its missing values taken from ``generator.defaults``."""
    return SamplingParams(max_tokens=max_tokens or defaults.max_tokens,
                          temperature=defaults.temperature if temperature is None else temperature,
                          top_p=defaults.top_p if top_p is None else top_p, stop=tuple(stop), seed=seed)


def rag_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], passages: Sequence[Passage],
               cfg: PromptConfig, context: int, max_tokens: int) -> tuple[Prompt, list[Citation]]:
    """``models.prompt.build_prompt`` over retrieved passages, and the passages it kept as the API cites them."""
    prompt = build_prompt(tokenizer, messages, [p.model_dump() for p in passages], cfg, context, max_tokens)
    return prompt, [Citation.model_validate(p) for p in prompt.passages]


# --- in one process ---------------------------------------------------------------------------------------------------

class RagPipeline:
    """Retrieval and generation in this process, through the same functions the Serve app runs."""

    def __init__(self, cfg: ServeJobConfig):
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
               k: int | None = None, filter: Filter | None = None, mode: str | None = None,
               fusion: FusionOverrides | None = None, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, stop: Sequence[str] = (),
               seed: int | None = None) -> dict[str, Any]:
        """Answer the last user message: {"text", "finish_reason", "citations", "usage"}, as ``ragtune ask --json``
        prints it (citations and usage as the API writes them). ``retrieval``, ``k``, ``filter``, ``mode`` and
        ``fusion`` as a chat request's ``retrieval`` extension gives them."""
        g = self.cfg.generator
        model = model or g.name
        if model != g.name and model not in g.adapters:
            raise NotFound(f"model {model!r} is not served (models: {[g.name, *g.adapters]})", param="model",
                           code="model_not_found")
        passages = self.retriever.search(messages[-1]["content"], k or self.cfg.retrieval.k, filter, mode, fusion) \
            if retrieval else []
        params = sampling_params(g.defaults, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 stop=stop, seed=seed)
        prompt, citations = rag_prompt(self.decoder.tokenizer, messages, passages, self.cfg.prompt,
                                       self.decoder.context, params.max_tokens)
        [out] = self.decoder.generate([GenRequest(prompt.ids, params, None if model == g.name else model)])
        return {"text": out.text, "finish_reason": out.finish_reason,
                "citations": [c.model_dump() for c in citations],
                "usage": Usage.of(out.prompt_tokens, out.completion_tokens).model_dump()}
