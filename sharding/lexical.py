"""Lexical (BM25) shards beside the FAISS shards: tokenizing, corpus statistics, build, shard files, search.

On disk, in the same version folder as the FAISS shards (one lexical shard per FAISS shard, the same chunk ids)::

    <path>/v-00002/lexical/shard-00000.npz   BM25 score matrix (CSC: data, indices, indptr), vocabulary,
                                             chunk_ids (row -> chunk id), parameters

The scores are those of `bm25s <https://github.com/xhluca/bm25s>`_ (BM25 precomputed per (document, term), so a
query sums a few matrix columns). Every shard is built with the statistics of the *whole* corpus (documents,
average length, document frequency of each term), gathered in a first pass over the shards: a chunk scores the
same in its shard as in one index over every chunk, so the top-k of the union is the top-k of the per-shard top-k
lists and merging by score is exact (as for FAISS shards). ``chunk_ids`` per shard lets a later delete mask rows
(bm25s' ``weight_mask``) without rebuilding. bm25s is imported inside functions, so importing this module is cheap.

Scores are built with bm25s' own scoring functions (``bm25s.scoring``, pinned version 0.3.16): its ``BM25.index``
computes the statistics from the documents it is given, one shard here, which would make shards disagree.
``tests/sharding/test_lexical.py`` checks that one shard built here equals ``bm25s.BM25.index`` exactly.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from configs.errors import RagtuneError
from sharding.storage import Location, atomic_write_bytes, exists, info, read_bytes, sha256_hex

LEXICAL_FORMAT = "ragtune.lexical/1"
STATS_FORMAT = "ragtune.lexical-stats/1"
LEXICAL_DIR = "lexical"
STATS_NAME = f"{LEXICAL_DIR}/stats.npz"  # the statistics of the live chunks, kept up to date by add/delete
Method = Literal["lucene", "robertson", "atire"]  # the BM25 variants that need no non-occurrence array


def lexical_name(index: int) -> str:
    return f"{LEXICAL_DIR}/shard-{index:05d}.npz"


def lexical_delta_name(shard: int, pos: int) -> str:
    return f"{LEXICAL_DIR}/shard-{shard:05d}.d{pos:03d}.npz"


# --- tokenizing ---------------------------------------------------------------------------------------------------

class LexicalParams(BaseModel):
    """How chunks and queries are tokenized and scored (the index.lexical config, as stored in the manifest)."""

    method: Method = "lucene"
    k1: float = 1.5
    b: float = 0.75
    stopwords: str | None = "english"  # bm25s' stopword list name (a language), or None
    stemmer: str | None = "english"  # PyStemmer (Snowball) algorithm, or None
    token_pattern: str = r"(?u)\b\w\w+\b"


def tokenizer(params: LexicalParams) -> Callable[[Sequence[str]], list[list[str]]]:
    """texts -> token lists, lower-cased, stopwords removed, stemmed: the same for chunks and queries."""
    import bm25s

    stem = None
    if params.stemmer:
        try:
            import Stemmer
        except ImportError:
            raise RagtuneError("index.lexical.stemmer needs PyStemmer. Fix: pip install PyStemmer==3.1.0, or set "
                               "index.lexical.stemmer: null") from None
        try:
            stem = Stemmer.Stemmer(params.stemmer).stemWords
        except KeyError:
            raise RagtuneError(f"index.lexical.stemmer = {params.stemmer!r} is not a Snowball algorithm. Fix: one "
                               f"of {', '.join(Stemmer.algorithms()[:8])}, ... or null") from None

    def tokenize(texts: Sequence[str]) -> list[list[str]]:
        if not texts:
            return []
        out = bm25s.tokenize(list(texts), lower=True, token_pattern=params.token_pattern,
                             stopwords=params.stopwords or [], stemmer=stem, return_ids=False, show_progress=False)
        return [list(t) for t in out]

    return tokenize


def chunk_texts(titles: Sequence[str | None], texts: Sequence[str | None]) -> list[str]:
    """What the lexical index reads of a chunk: its document's title and its text."""
    return [f"{t} {x or ''}" if t else (x or "") for t, x in zip(titles, texts, strict=True)]


# --- corpus statistics (first pass) ---------------------------------------------------------------------------------

@dataclass
class CorpusStats:
    """What BM25 needs of the whole corpus: documents, their total length, documents holding each term."""

    n_docs: int = 0
    total_len: int = 0
    df: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, docs: Iterable[Sequence[str]]) -> CorpusStats:
        s = cls()
        for toks in docs:
            s.n_docs += 1
            s.total_len += len(toks)
            s.df.update(set(toks))
        return s

    def merge(self, other: CorpusStats) -> CorpusStats:
        return CorpusStats(self.n_docs + other.n_docs, self.total_len + other.total_len, self.df + other.df)

    def minus(self, other: CorpusStats) -> CorpusStats:
        """These statistics without the chunks of ``other`` (deleted chunks; terms left in no chunk go)."""
        return CorpusStats(self.n_docs - other.n_docs, self.total_len - other.total_len, self.df - other.df)

    def to_bytes(self) -> bytes:
        """One ``.npz``: chunk count, total length, the terms (JSON) and their document frequencies."""
        terms = sorted(self.df)
        buf = io.BytesIO()
        np.savez(buf, format=np.array(STATS_FORMAT), n_docs=np.array(self.n_docs), total_len=np.array(self.total_len),
                 terms=np.frombuffer(json.dumps(terms).encode(), dtype=np.uint8),
                 df=np.array([self.df[t] for t in terms], dtype=np.int64))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CorpusStats:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        if str(z["format"]) != STATS_FORMAT:
            raise ValueError(f"format {str(z['format'])!r}, expected {STATS_FORMAT!r}")
        terms = json.loads(z["terms"].tobytes().decode())
        return cls(int(z["n_docs"]), int(z["total_len"]), Counter(dict(zip(terms, z["df"].tolist(), strict=True))))

    @property
    def avg_len(self) -> float:
        return self.total_len / self.n_docs if self.n_docs else 0.0


# --- one shard ----------------------------------------------------------------------------------------------------

@dataclass
class LexicalShard:
    """A loaded BM25 shard: a ``bm25s.BM25`` whose rows are this shard's chunks, and their chunk ids."""

    model: Any  # bm25s.BM25
    chunk_ids: np.ndarray  # (n,) int64, row -> chunk id
    mask: np.ndarray | None = None  # (n,) float32 bm25s weight_mask: 0 for masked (deleted) rows; None: none

    @property
    def ntotal(self) -> int:
        return len(self.chunk_ids)

    def masked(self, dead: np.ndarray) -> LexicalShard:
        """This shard with the rows of chunk ids ``dead`` scored 0 (never returned): tombstones."""
        rows = np.isin(self.chunk_ids, np.asarray(dead, dtype=np.int64))
        if not rows.any():
            return LexicalShard(self.model, self.chunk_ids)
        mask = np.ones(self.ntotal, dtype=np.float32)
        mask[rows] = 0
        return LexicalShard(self.model, self.chunk_ids, mask)

    def search(self, query_tokens: Sequence[Sequence[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) per query: BM25 scores (higher is better) and chunk ids; -1 where fewer than k chunks
        share a term with the query (a chunk with score 0 is not a match)."""
        nq, n = len(query_tokens), self.ntotal
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, n)
        for q, toks in enumerate(query_tokens):
            ids = self.model.get_tokens_ids(list(toks))
            if not ids or kk == 0:
                continue
            s = self.model.get_scores_from_ids(ids, weight_mask=self.mask)
            top = np.argpartition(-s, kk - 1)[:kk] if kk < n else np.arange(n)
            top = top[np.lexsort((top, -s[top]))]  # by score, then row: deterministic ties
            top = top[s[top] > 0]
            D[q, :len(top)] = s[top]
            I[q, :len(top)] = self.chunk_ids[top]
        return D, I


def build_shard(tokens: Sequence[Sequence[str]], chunk_ids: np.ndarray, stats: CorpusStats,
                params: LexicalParams) -> LexicalShard:
    """BM25 scores of one shard's chunks with the whole corpus' statistics ``stats`` (see the module doc)."""
    import bm25s
    from bm25s.scoring import (
        _build_idf_array,
        _build_scores_and_indices_for_matrix,
        _np_csc_python,
        _select_idf_scorer,
    )

    vocab: dict[str, int] = {}
    token_ids = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in tokens]
    missing = [t for t in vocab if stats.df.get(t, 0) == 0]
    if missing:
        raise RagtuneError(f"lexical shard holds terms the corpus statistics do not ({missing[:3]}): the shard was "
                           "tokenized differently from the statistics pass. Fix: rerun `ragtune index`")
    df = {vocab[t]: stats.df[t] for t in vocab}
    model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    idf = _build_idf_array(doc_frequencies=df, n_docs=stats.n_docs,
                           compute_idf_fn=_select_idf_scorer(model.idf_method), dtype=model.dtype)
    # the local df sizes the arrays (one entry per (document, distinct term) of this shard); avg_doc_len as a
    # float64 scalar, as BM25.index passes it (NumPy then computes in float64 before storing float32)
    local_df = Counter(i for doc in token_ids for i in set(doc))
    data, rows, cols = _build_scores_and_indices_for_matrix(
        corpus_token_ids=token_ids, idf_array=idf, avg_doc_len=np.float64(stats.avg_len), doc_frequencies=local_df,
        k1=params.k1, b=params.b, delta=model.delta, nonoccurrence_array=None, method=params.method,
        dtype=model.dtype, int_dtype=model.int_dtype, show_progress=False)
    vocab.setdefault("", len(vocab))  # bm25s' empty token (BM25.index adds it too): empty texts tokenize to it
    data, indices, indptr = _np_csc_python(data, rows, cols, shape=(len(token_ids), len(vocab)))
    return _shard(model, data, indices, indptr, len(token_ids), vocab, chunk_ids)


def _shard(model: Any, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_docs: int,
           vocab: dict[str, int], chunk_ids: np.ndarray) -> LexicalShard:
    model.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
    model.vocab_dict = vocab
    model.unique_token_ids_set = set(vocab.values())
    model.nonoccurrence_array = None
    return LexicalShard(model, np.asarray(chunk_ids, dtype=np.int64))


# --- shard files --------------------------------------------------------------------------------------------------

def serialize(shard: LexicalShard, params: LexicalParams) -> bytes:
    """One .npz: the CSC score matrix, the vocabulary (JSON), chunk ids, parameters (JSON)."""
    s = shard.model.scores
    buf = io.BytesIO()
    np.savez(buf, format=np.array(LEXICAL_FORMAT), data=s["data"], indices=s["indices"], indptr=s["indptr"],
             num_docs=np.array(s["num_docs"]), chunk_ids=shard.chunk_ids,
             vocab=np.frombuffer(json.dumps(shard.model.vocab_dict).encode(), dtype=np.uint8),
             params=np.array(params.model_dump_json()))
    return buf.getvalue()


def deserialize(data: bytes) -> LexicalShard:
    import bm25s

    z = np.load(io.BytesIO(data), allow_pickle=False)
    if str(z["format"]) != LEXICAL_FORMAT:
        raise ValueError(f"format {str(z['format'])!r}, expected {LEXICAL_FORMAT!r}")
    params = LexicalParams.model_validate_json(str(z["params"]))
    model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    vocab = json.loads(z["vocab"].tobytes().decode())
    return _shard(model, z["data"], z["indices"], z["indptr"], int(z["num_docs"]), vocab, z["chunk_ids"])


def write_lexical_file(shard: LexicalShard, params: LexicalParams, loc: Location) -> tuple[str, int]:
    """Write a lexical shard atomically; returns (sha256, bytes)."""
    data = serialize(shard, params)
    atomic_write_bytes(loc, data)
    return sha256_hex(data), len(data)


def read_lexical_file(loc: Location, sha256: str | None = None) -> LexicalShard:
    """Read a lexical shard; with ``sha256`` verify it first. A missing, altered or unreadable file is a
    RagtuneError naming the file."""
    fix = "Fix: rebuild the index with `ragtune index` (it writes a new version), or open an older version"
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: lexical shard listed in the manifest is missing. {fix}")
    data = read_bytes(loc)
    if sha256 is not None and sha256_hex(data) != sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch: the lexical shard was changed or truncated after it was "
                           f"written ({info(loc).size:,} bytes on disk). {fix}")
    try:
        return deserialize(data)
    except Exception as e:  # zip, npz, JSON and pydantic errors all mean the same here
        raise RagtuneError(f"{loc.uri}: not a readable lexical shard, truncated or corrupted "
                           f"({type(e).__name__}: {str(e)[:160]}). {fix}") from None


# --- manifest part ------------------------------------------------------------------------------------------------

class LexicalRecord(BaseModel):
    file: str  # relative to the version folder
    ntotal: int
    terms: int
    sha256: str
    bytes: int
    seconds: float = 0.0


class LexicalStatsRecord(BaseModel):
    """The statistics file: what the next delta's BM25 scores are built with."""

    file: str
    sha256: str
    bytes: int


class LexicalManifest(BaseModel):
    """The ``lexical`` part of an index manifest: one BM25 shard per FAISS shard, the same chunk ids (the BM25
    rows of delta segments are in their ``DeltaRecord``); ``n_docs``, ``avg_len`` and ``terms`` are the
    statistics of the live chunks, the ones ``stats`` holds."""

    kind: str = "bm25"
    library: str = "bm25s"
    library_version: str
    params: LexicalParams
    n_docs: int
    avg_len: float
    terms: int  # distinct terms in the whole corpus
    shards: list[LexicalRecord] = Field(default_factory=list)
    stats: LexicalStatsRecord | None = None  # None: no stats file (counted from the docstore when an add needs them)
