"""Lexical (BM25) shards beside the FAISS shards: tokenizing, corpus statistics, build, shard folders, search.

On disk, in the same version folder as the FAISS shards (one lexical shard per FAISS shard, the same chunk ids),
one folder per shard (or delta) of plain ``.npy`` arrays that a searcher memory-maps (``np.load(mmap_mode="r")``,
as ``bm25s.BM25.load(mmap=True)`` does, whose file names the score matrix keeps)::

    <path>/v-00002/lexical/shard-00000/shard.json             format, parameters, counts; bytes + sha256 per file
    <path>/v-00002/lexical/shard-00000/data.csc.index.npy     (nnz,) float32 BM25 score per (chunk, term)
    <path>/v-00002/lexical/shard-00000/indices.csc.index.npy  (nnz,) int32 row of each score
    <path>/v-00002/lexical/shard-00000/indptr.csc.index.npy   (V + 1,) int64 column start per term (CSC)
    <path>/v-00002/lexical/shard-00000/chunk_ids.npy          (n,) int64 row -> chunk id
    <path>/v-00002/lexical/shard-00000/vocab.offsets.npy      (V + 1,) int64 start of each term in vocab.terms.npy
    <path>/v-00002/lexical/shard-00000/vocab.terms.npy        (bytes,) uint8 the terms, UTF-8, sorted, concatenated
    <path>/v-00002/lexical/stats.npz                          the corpus statistics (:class:`CorpusStats`)

The vocabulary is the shard's sorted terms, and a term's column is its rank: a query term is found by binary
search over the mapped arrays (:class:`Terms`), so a searcher holds no Python object per term. A loaded shard's
anonymous memory is a few KiB plus one float32 per row per query; the rest is file pages the kernel shares and
evicts (measured on 200k chunks: 110 MiB as one .npz read into memory, 0.2 MiB mapped). Object stores
(``s3://`` ...) cannot be mapped: their shards are read into memory, as are shards opened with ``mmap=False``.
Shards of format 1 (one ``.npz`` per shard, indexes written before this layout) still load, into memory.

Checksums: each file's sha256 and size are computed while it is written and kept in ``shard.json``, whose own
sha256 the manifest records. Loading always checks ``shard.json``'s sha256, every file's size and the arrays'
shapes against it; ``verify`` (the default, as for FAISS shards) also hashes every file, which reads it once
through the page cache (time at startup, no anonymous memory); serving's ``index.verify: false`` skips that.

The scores are those of `bm25s <https://github.com/xhluca/bm25s>`_ (BM25 precomputed per (document, term), so a
query sums a few matrix columns). Every shard is built with the statistics of the *whole* corpus (documents,
average length, document frequency of each term), gathered in a first pass over the shards: a chunk scores the
same in its shard as in one index over every chunk, so the top-k of the union is the top-k of the per-shard top-k
lists and merging by score is exact (as for FAISS shards). The statistics are compact arrays (sorted terms as
bytes + int64 counts), merged with one pyarrow sort, not a Python dict per term. ``chunk_ids`` per shard lets a
later delete mask rows without rebuilding. bm25s and pyarrow's compute functions are imported inside functions.

Scores are built with bm25s' own scoring functions (``bm25s.scoring``, pinned version 0.3.16): its ``BM25.index``
computes the statistics from the documents it is given, one shard here, which would make shards disagree.
``tests/sharding/test_lexical.py`` checks that one shard built here equals ``bm25s.BM25.index`` exactly.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from configs.errors import RagtuneError
from sharding.storage import (
    TMP_MARK,
    Location,
    atomic_write_bytes,
    exists,
    info,
    read_bytes,
    sha256_file,
    sha256_hex,
    uploads_whole,
)

LEXICAL_FORMAT = "ragtune.lexical/2"  # a folder of .npy arrays + shard.json
LEXICAL_FORMAT_V1 = "ragtune.lexical/1"  # one .npz per shard (read into memory; still loads)
STATS_FORMAT = "ragtune.lexical-stats/2"  # sorted terms as bytes + offsets, int64 document frequencies
STATS_FORMAT_V1 = "ragtune.lexical-stats/1"  # terms as JSON (still reads)
LEXICAL_DIR = "lexical"
STATS_NAME = f"{LEXICAL_DIR}/stats.npz"  # the statistics of the live chunks, kept up to date by add/delete
HEADER = "shard.json"
ARRAYS = {  # key -> file name inside a shard folder (the score matrix under bm25s' own names)
    "data": "data.csc.index.npy", "indices": "indices.csc.index.npy", "indptr": "indptr.csc.index.npy",
    "chunk_ids": "chunk_ids.npy", "term_offsets": "vocab.offsets.npy", "term_bytes": "vocab.terms.npy",
}
Method = Literal["lucene", "robertson", "atire"]  # the BM25 variants that need no non-occurrence array


def lexical_name(index: int) -> str:
    return f"{LEXICAL_DIR}/shard-{index:05d}"


def lexical_delta_name(shard: int, pos: int) -> str:
    return f"{LEXICAL_DIR}/shard-{shard:05d}.d{pos:03d}"


def lexical_files(name: str) -> list[str]:
    """The files of the lexical shard a manifest names ``name`` (a folder; a format-1 ``.npz`` is one file)."""
    if name.endswith(".npz"):
        return [name]
    return [f"{name}/{HEADER}"] + [f"{name}/{f}" for f in ARRAYS.values()]


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


# --- vocabularies as arrays ---------------------------------------------------------------------------------------

def _key(term: str) -> bytes:
    return term.encode("utf-8", "surrogatepass")  # byte order = code point order: sorted str stays sorted


class Terms(Mapping[str, int]):
    """Sorted distinct terms -> their rank, held as two arrays (no Python object per term): ``offsets`` (V + 1,)
    int64 and ``blob`` (offsets[-1],) uint8, the terms' UTF-8 bytes concatenated in byte order. Lookups are a
    binary search (log2 V slices of the arrays), so both may be memory-mapped."""

    def __init__(self, offsets: np.ndarray, blob: np.ndarray):
        self.offsets, self.blob = offsets, blob

    @classmethod
    def of(cls, keys: Sequence[bytes]) -> Terms:
        """From terms already encoded (:func:`_key`) and sorted."""
        offsets = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum([len(k) for k in keys], out=offsets[1:])
        return cls(offsets, np.frombuffer(b"".join(keys), dtype=np.uint8))

    @classmethod
    def from_arrow(cls, arr: Any) -> Terms:
        """From a pyarrow ``large_binary`` array (copies its two buffers into numpy arrays)."""
        arr = arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr
        n = len(arr)
        if n == 0:
            return cls(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))
        _, obuf, dbuf = arr.buffers()
        offsets = np.frombuffer(obuf, dtype=np.int64)[arr.offset:arr.offset + n + 1]
        blob = np.zeros(0, np.uint8) if dbuf is None else np.frombuffer(dbuf, dtype=np.uint8)[offsets[0]:offsets[-1]]
        return cls(offsets - offsets[0], blob.copy())

    def arrow(self) -> Any:
        """These terms as a pyarrow ``large_binary`` array over the same memory (no copy)."""
        return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(self), [None, pa.py_buffer(self.offsets),
                                                                                pa.py_buffer(self.blob)])

    def _keys(self) -> _Keys:
        return _Keys(np.ascontiguousarray(self.offsets).data.cast("B").cast("q"),
                     np.ascontiguousarray(self.blob).data.cast("B"))

    def key(self, i: int) -> bytes:
        return self._keys()[i]

    def find(self, term: str) -> int:
        """The rank of ``term``, -1 when it is not one of these terms."""
        return self.ids([term], missing=-1)[0]

    def ids(self, terms: Iterable[str], missing: int | None = None) -> list[int]:
        """The ranks of ``terms``; a term not among these is left out (``missing`` None) or gets ``missing``."""
        keys = self._keys()
        out = []
        for term in terms:
            k = _key(term)
            i = bisect.bisect_left(keys, k)
            if i < len(keys) and keys[i] == k:
                out.append(i)
            elif missing is not None:
                out.append(missing)
        return out

    def __getitem__(self, term: str) -> int:
        i = self.find(term)
        if i < 0:
            raise KeyError(term)
        return i

    def get(self, term: str, default: Any = None) -> Any:
        i = self.find(term)
        return default if i < 0 else i

    def __contains__(self, term: object) -> bool:
        return isinstance(term, str) and self.find(term) >= 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __iter__(self) -> Iterator[str]:
        keys = self._keys()
        return (keys[i].decode("utf-8", "surrogatepass") for i in range(len(self)))


class _Keys:
    """The encoded terms as a sequence for ``bisect``, read through memoryviews of the (mapped) arrays: about
    10 us per lookup in 300k terms (numpy scalar indexing of a memmap: 80 us)."""

    def __init__(self, offsets: memoryview, blob: memoryview):
        self.offsets, self.blob = offsets, blob

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]])


@dataclass(frozen=True)
class _Counts(Mapping[str, int]):
    """``CorpusStats.df``: term -> documents holding it, over the arrays."""

    terms: Terms
    counts: np.ndarray

    def __getitem__(self, term: str) -> int:
        return int(self.counts[self.terms[term]])

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)


def _summed(keys: Any, counts: np.ndarray) -> tuple[Terms, np.ndarray]:
    """(terms, counts) of terms that may repeat -> each term once with its summed count, sorted; terms whose sum
    is not positive go (``Counter`` subtraction). One pyarrow sort, then runs of equal terms found by pyarrow's
    vectorised compare and summed by ``np.add.reduceat``: no per-term Python loop (measured 6x faster than
    pyarrow's hash group-by here)."""
    import pyarrow.compute as pc

    arr = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    order = pc.sort_indices(arr)
    arr, c = arr.take(order), np.asarray(counts, dtype=np.int64)[order.to_numpy()]
    if len(arr) > 1:  # the first of each run of equal terms
        starts = np.flatnonzero(np.concatenate([[True], ~pc.equal(arr[1:], arr[:-1]).to_numpy(zero_copy_only=False)]))
        arr, c = arr.take(pa.array(starts)), np.add.reduceat(c, starts)
    keep = np.flatnonzero(c > 0)
    if len(keep) < len(c):
        arr, c = arr.take(pa.array(keep)), c[keep]
    return Terms.from_arrow(arr), c


# --- corpus statistics (first pass) ---------------------------------------------------------------------------------

def _no_terms() -> Terms:
    return Terms(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8))


@dataclass(eq=False)
class CorpusStats:
    """What BM25 needs of the whole corpus: documents, their total length, documents holding each term.

    The terms are a sorted :class:`Terms` and ``counts`` (V,) int64 their document frequencies: a few arrays
    (about 12 bytes + the term per term), which Ray ships and shares without copying. ``df`` reads them as a
    mapping (term -> count), as the ``Counter`` it replaces did.
    """

    n_docs: int = 0
    total_len: int = 0
    terms: Terms = field(default_factory=_no_terms)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def of(cls, docs: Iterable[Sequence[str]]) -> CorpusStats:
        n_docs = total_len = 0
        df: Counter[str] = Counter()
        for toks in docs:
            n_docs += 1
            total_len += len(toks)
            df.update(set(toks))
        terms, counts = _summed(pa.array([_key(t) for t in df], pa.large_binary()),
                                np.fromiter(df.values(), dtype=np.int64, count=len(df)))
        return cls(n_docs, total_len, terms, counts)

    @classmethod
    def merge_all(cls, parts: Sequence[CorpusStats]) -> CorpusStats:
        """The statistics of the union of disjoint chunk sets (one sort over every part's terms)."""
        if not parts:
            return cls()
        keys = pa.chunked_array([p.terms.arrow() for p in parts], type=pa.large_binary())
        terms, counts = _summed(keys, np.concatenate([p.counts for p in parts]))
        return cls(sum(p.n_docs for p in parts), sum(p.total_len for p in parts), terms, counts)

    def merge(self, other: CorpusStats) -> CorpusStats:
        return CorpusStats.merge_all([self, other])

    def minus(self, other: CorpusStats) -> CorpusStats:
        """These statistics without the chunks of ``other`` (deleted chunks; terms left in no chunk go)."""
        keys = pa.chunked_array([self.terms.arrow(), other.terms.arrow()], type=pa.large_binary())
        terms, counts = _summed(keys, np.concatenate([self.counts, -other.counts]))
        return CorpusStats(self.n_docs - other.n_docs, self.total_len - other.total_len, terms, counts)

    @property
    def df(self) -> Mapping[str, int]:
        return _Counts(self.terms, self.counts)

    def df_of(self, keys: Sequence[bytes]) -> np.ndarray:
        """(len(keys),) int64 document frequencies of encoded terms, 0 for a term these statistics lack. Hashes
        ``keys`` (one shard's vocabulary) and streams the corpus' terms past them: memory O(keys) + 4 bytes/term."""
        import pyarrow.compute as pc

        out = np.zeros(len(keys), dtype=np.int64)
        if not len(keys) or not len(self.terms):
            return out
        pos = pc.index_in(self.terms.arrow(), value_set=pa.array(keys, pa.large_binary()))
        found = pos.is_valid().to_numpy(zero_copy_only=False)
        out[pos.drop_null().to_numpy()] = self.counts[found]
        return out

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CorpusStats) and (self.n_docs, self.total_len) == (other.n_docs, other.total_len)
                and np.array_equal(self.terms.offsets, other.terms.offsets)
                and np.array_equal(self.terms.blob, other.terms.blob) and np.array_equal(self.counts, other.counts))

    def to_bytes(self) -> bytes:
        """One ``.npz``: chunk count, total length, the sorted terms (offsets + UTF-8 bytes), their counts."""
        buf = io.BytesIO()
        np.savez(buf, format=np.array(STATS_FORMAT), n_docs=np.array(self.n_docs), total_len=np.array(self.total_len),
                 term_offsets=self.terms.offsets, term_bytes=self.terms.blob, df=self.counts)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CorpusStats:
        """Format 2, or format 1 (terms as JSON, written before the arrays)."""
        z = np.load(io.BytesIO(data), allow_pickle=False)
        fmt = str(z["format"])
        if fmt == STATS_FORMAT_V1:
            terms = json.loads(z["terms"].tobytes().decode())
            t, c = _summed(pa.array([_key(x) for x in terms], pa.large_binary()), z["df"])
            return cls(int(z["n_docs"]), int(z["total_len"]), t, c)
        if fmt != STATS_FORMAT:
            raise ValueError(f"format {fmt!r}, expected {STATS_FORMAT!r}")
        return cls(int(z["n_docs"]), int(z["total_len"]), Terms(z["term_offsets"], z["term_bytes"]), z["df"])

    @property
    def avg_len(self) -> float:
        return self.total_len / self.n_docs if self.n_docs else 0.0


# --- one shard ----------------------------------------------------------------------------------------------------

@dataclass
class LexicalShard:
    """A loaded BM25 shard: a ``bm25s.BM25`` whose rows are this shard's chunks (its score arrays and its
    vocabulary, a :class:`Terms`, memory-mapped when loaded from a local folder), and their chunk ids."""

    model: Any  # bm25s.BM25
    chunk_ids: np.ndarray  # (n,) int64, row -> chunk id
    dead: np.ndarray | None = None  # rows scored 0 (never returned): masked (deleted) chunks; None: none

    @property
    def ntotal(self) -> int:
        return len(self.chunk_ids)

    @property
    def terms(self) -> Mapping[str, int]:
        return self.model.vocab_dict  # type: ignore[no-any-return]

    def masked(self, dead: np.ndarray) -> LexicalShard:
        """This shard with the rows of chunk ids ``dead`` scored 0 (never returned): tombstones."""
        rows = np.flatnonzero(np.isin(self.chunk_ids, np.asarray(dead, dtype=np.int64)))
        return LexicalShard(self.model, self.chunk_ids, rows if len(rows) else None)

    def search(self, query_tokens: Sequence[Sequence[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D, I) per query: BM25 scores (higher is better) and chunk ids; -1 where fewer than k chunks
        share a term with the query (a chunk with score 0 is not a match)."""
        nq, n = len(query_tokens), self.ntotal
        D = np.full((nq, k), -np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, n)
        vocab = self.terms
        for q, toks in enumerate(query_tokens):
            ids = vocab.ids(toks) if isinstance(vocab, Terms) else [vocab[t] for t in toks if t in vocab]
            if not ids or kk == 0:
                continue
            s = self.model.get_scores_from_ids(ids)  # (n,) float32
            if self.dead is not None:
                s[self.dead] = 0
            top = np.argpartition(-s, kk - 1)[:kk] if kk < n else np.arange(n)
            top = top[np.lexsort((top, -s[top]))]  # by score, then row: deterministic ties
            top = top[s[top] > 0]
            D[q, :len(top)] = s[top]
            I[q, :len(top)] = self.chunk_ids[top]
        return D, I


class DocTerms:
    """One shard's (chunk, distinct term, count) triples, gathered a batch of token lists at a time: a dict of the
    shard's terms (ids in order of first sight) and three int32 arrays, 12 bytes a triple. The token lists of the
    whole shard are never held (they took about 16 bytes a token, as Python lists, plus the texts); ``finish``
    scores the triples into a :class:`LexicalShard`."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"": 0}  # bm25s' empty token (BM25.index adds it too; no chunk holds it)
        self._docs: list[np.ndarray] = []
        self._terms: list[np.ndarray] = []
        self._tfs: list[np.ndarray] = []
        self._lens: list[np.ndarray] = []
        self.n_docs = 0

    def add(self, tokens: Sequence[Sequence[str]]) -> None:
        """Count a batch of documents (token lists), the next rows of the shard in order."""
        if not len(tokens):
            return
        vocab = self.vocab
        lens = np.fromiter((len(d) for d in tokens), dtype=np.int64, count=len(tokens))
        flat = np.fromiter((vocab.setdefault(t, len(vocab)) for d in tokens for t in d), dtype=np.int64,
                           count=int(lens.sum()))
        doc = np.repeat(np.arange(self.n_docs, self.n_docs + len(tokens), dtype=np.int64), lens)
        key, tf = np.unique((doc << 32) | flat, return_counts=True)  # sorted: by row, then term
        self._docs.append((key >> 32).astype(np.int32))
        self._terms.append((key & 0xFFFFFFFF).astype(np.int32))
        self._tfs.append(tf.astype(np.int32))
        self._lens.append(lens.astype(np.int32))
        self.n_docs += len(tokens)

    @property
    def nnz(self) -> int:
        return sum(len(d) for d in self._docs)

    def finish(self, chunk_ids: np.ndarray, stats: CorpusStats, params: LexicalParams) -> LexicalShard:
        """BM25 scores of the counted rows with the whole corpus' statistics ``stats``. The shard's terms are
        sorted; a term's column is its rank. Scored in slices of ``SCORE_SLICE`` triples (the float64 temporaries
        of bm25s' formulas stay small); the same arithmetic as bm25s' ``BM25.index``, so the same float32 scores."""
        import bm25s
        from bm25s.scoring import _build_idf_array, _select_idf_scorer, _select_tfc_scorer

        if len(chunk_ids) != self.n_docs:
            raise ValueError(f"{len(chunk_ids)} chunk ids for {self.n_docs} counted rows")
        keys = [_key(t) for t in self.vocab]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        rank = np.empty(len(keys), dtype=np.int32)
        rank[np.asarray(order, dtype=np.int64)] = np.arange(len(keys), dtype=np.int32)
        keys = [keys[i] for i in order]
        self.vocab = {}
        df = stats.df_of(keys)
        missing = np.flatnonzero(df[1:] == 0) + 1
        if len(missing):
            raise RagtuneError(f"lexical shard holds terms the corpus statistics do not "
                               f"({[keys[i] for i in missing[:3]]}): the shard was tokenized differently from "
                               "the statistics pass. Fix: rerun `ragtune index`")
        model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        idf = _build_idf_array(doc_frequencies=dict(enumerate(df.tolist())), n_docs=stats.n_docs,
                               compute_idf_fn=_select_idf_scorer(model.idf_method), dtype=model.dtype)
        tfc = _select_tfc_scorer(params.method)
        rows, self._docs = _joined(self._docs, np.int32), []  # each list let go once joined: one copy at a time
        cols, self._terms = rank[_joined(self._terms, np.int32)], []
        tfs, self._tfs = _joined(self._tfs, np.int32), []
        lens, self._lens = _joined(self._lens, np.int32), []
        data = np.empty(len(rows), dtype=model.dtype)
        avg = np.float64(stats.avg_len)  # a float64 scalar, as BM25.index passes it (NumPy computes in float64)
        for s in range(0, len(rows), SCORE_SLICE):
            sl = slice(s, s + SCORE_SLICE)
            data[sl] = idf[cols[sl]] * tfc(tf_array=tfs[sl].astype(model.dtype), l_d=lens[rows[sl]], l_avg=avg,
                                           k1=params.k1, b=params.b, delta=model.delta)
        del tfs
        # CSC: triples come sorted by row, so a stable sort by column gives (column, row) order, as bm25s'
        # _np_csc_python does with one int64 key per triple (8 bytes a triple less here)
        sorter = np.argsort(cols, kind="stable")
        indptr = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(np.bincount(cols, minlength=len(keys)), out=indptr[1:])
        data, indices = data[sorter], rows[sorter]
        return _shard(model, data, indices, indptr, self.n_docs, Terms.of(keys), chunk_ids)


SCORE_SLICE = 1 << 18  # triples scored at once: a few float64 temporaries of this length (12 MiB)


def _joined(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def build_shard(tokens: Sequence[Sequence[str]], chunk_ids: np.ndarray, stats: CorpusStats,
                params: LexicalParams) -> LexicalShard:
    """BM25 scores of one shard's chunks (their token lists) with the whole corpus' statistics ``stats`` (see the
    module doc and :class:`DocTerms`, which a large shard fills a batch at a time)."""
    terms = DocTerms()
    terms.add(tokens)
    return terms.finish(chunk_ids, stats, params)


def _shard(model: Any, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_docs: int,
           vocab: Mapping[str, int], chunk_ids: np.ndarray) -> LexicalShard:
    model.scores = {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}
    model.vocab_dict = vocab
    model.unique_token_ids_set = None  # only BM25.retrieve reads it; search here goes through get_scores_from_ids
    model.nonoccurrence_array = None
    return LexicalShard(model, chunk_ids if chunk_ids.dtype == np.int64 else chunk_ids.astype(np.int64))


# --- shard folders ------------------------------------------------------------------------------------------------

class _Hashing:
    """A binary writer that hashes and counts what passes through it (np.save writes in 16 MiB pieces)."""

    def __init__(self, f: Any):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)  # type: ignore[no-any-return]


def _write_npy(loc: Location, arr: np.ndarray) -> dict[str, Any]:
    """``np.save`` to a temporary sibling, renamed (after an fsync on local disks; on S3 in place), hashed on the
    way out; returns the file's entry of ``shard.json``."""
    tmp = f"{loc.path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    if loc.is_local:
        with open(tmp, "wb") as f:
            w = _Hashing(f)
            np.save(w, arr, allow_pickle=False)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    else:
        in_place = uploads_whole(loc)  # S3: a key appears whole or not at all (storage.uploads_whole)
        with loc.fs.open_output_stream(loc.path if in_place else tmp) as f:
            w = _Hashing(f)
            np.save(w, arr, allow_pickle=False)  # type: ignore[arg-type]
        if not in_place:
            loc.fs.move(tmp, loc.path)
    return {"bytes": w.bytes, "sha256": w.sha.hexdigest(), "dtype": arr.dtype.str, "shape": list(arr.shape)}


def write_lexical_file(shard: LexicalShard, params: LexicalParams, loc: Location) -> tuple[str, int]:
    """Write a lexical shard as the folder ``loc`` (every file atomically, ``shard.json`` last); returns (sha256
    of ``shard.json``, bytes of the whole folder)."""
    s = shard.model.scores
    vocab = shard.terms
    if not isinstance(vocab, Terms):  # a format-1 shard's dict (rewritten by hand): sort it into columns
        raise RagtuneError("write_lexical_file needs a shard built by build_shard (sorted Terms). Fix: rebuild it")
    if loc.is_local:
        os.makedirs(loc.path, exist_ok=True)
    else:
        loc.fs.create_dir(loc.path, recursive=True)
    arrays = {"data": s["data"], "indices": s["indices"], "indptr": s["indptr"], "chunk_ids": shard.chunk_ids,
              "term_offsets": vocab.offsets, "term_bytes": vocab.blob}
    files = {ARRAYS[k]: _write_npy(loc.join(ARRAYS[k]), np.asarray(a)) for k, a in arrays.items()}
    header = json.dumps({"format": LEXICAL_FORMAT, "library": "bm25s", "params": params.model_dump(),
                         "num_docs": int(s["num_docs"]), "terms": len(vocab), "nnz": int(len(s["data"])),
                         "files": files}, indent=1).encode()
    atomic_write_bytes(loc.join(HEADER), header)
    return sha256_hex(header), len(header) + sum(f["bytes"] for f in files.values())


def read_lexical_file(loc: Location, sha256: str | None = None, mmap: bool = True) -> LexicalShard:
    """Load a lexical shard folder: its arrays memory-mapped when local and ``mmap``, else read into memory
    (object stores cannot be mapped). ``shard.json``'s sha256 is checked against ``sha256`` (the manifest's) and
    every file's size and shape against ``shard.json``; with ``sha256`` every file is hashed as well (the module
    doc). A format-1 ``.npz`` is read into memory. A missing, altered or unreadable shard is a RagtuneError
    naming the file."""
    fix = "Fix: rebuild the index with `ragtune index` (it writes a new version), or open an older version"
    if loc.path.endswith(".npz"):
        return _read_v1(loc, sha256, fix)
    head = loc.join(HEADER)
    if not exists(head):
        raise RagtuneError(f"{loc.uri}: lexical shard listed in the manifest is missing ({HEADER} not found). {fix}")
    raw = read_bytes(head)
    if sha256 is not None and sha256_hex(raw) != sha256:
        raise RagtuneError(f"{head.uri}: checksum mismatch: the lexical shard was changed after it was written. {fix}")
    try:
        header = json.loads(raw)
        if header.get("format") != LEXICAL_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {LEXICAL_FORMAT!r}")
        params = LexicalParams.model_validate(header["params"])
    except Exception as e:  # JSON, key and pydantic errors all mean the same here
        raise RagtuneError(f"{head.uri}: not a readable lexical shard header ({type(e).__name__}: "
                           f"{str(e)[:160]}). {fix}") from None
    arrays = {k: _read_npy(loc.join(name), header["files"].get(name), sha256 is not None, mmap, fix)
              for k, name in ARRAYS.items()}
    n, V, nnz = header["num_docs"], header["terms"], header["nnz"]
    shapes = {"data": (nnz,), "indices": (nnz,), "indptr": (V + 1,), "chunk_ids": (n,), "term_offsets": (V + 1,)}
    bad = [f"{ARRAYS[k]} {arrays[k].shape} != {want}" for k, want in shapes.items() if arrays[k].shape != want]
    if bad:
        raise RagtuneError(f"{loc.uri}: lexical shard arrays disagree with {HEADER} ({'; '.join(bad)}). {fix}")
    import bm25s

    model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
    return _shard(model, arrays["data"], arrays["indices"], arrays["indptr"], n,
                  Terms(arrays["term_offsets"], arrays["term_bytes"]), arrays["chunk_ids"])


def _read_npy(loc: Location, meta: dict[str, Any] | None, verify: bool, mmap: bool, fix: str) -> np.ndarray:
    """One array of a shard folder, checked against its ``shard.json`` entry ``meta``."""
    if meta is None:
        raise RagtuneError(f"{loc.uri}: not listed in the shard's {HEADER}. {fix}")
    st = info(loc)
    if st.type == pafs.FileType.NotFound:
        raise RagtuneError(f"{loc.uri}: file of a lexical shard listed in the manifest is missing. {fix}")
    if (size := st.size) != meta["bytes"]:
        raise RagtuneError(f"{loc.uri}: {size:,} bytes on disk but {HEADER} says {meta['bytes']:,}: truncated or "
                           f"changed after it was written. {fix}")
    data = None if loc.is_local and mmap else read_bytes(loc)
    if verify:
        digest = sha256_file(loc.path) if data is None else sha256_hex(data)
        if digest != meta["sha256"]:
            raise RagtuneError(f"{loc.uri}: checksum mismatch: the lexical shard was changed after it was written. "
                               f"{fix}")
    try:
        arr = np.load(loc.path, mmap_mode="r") if data is None else np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # a header numpy cannot parse
        raise RagtuneError(f"{loc.uri}: not a readable .npy array ({type(e).__name__}: {str(e)[:160]}). {fix}") \
            from None
    if arr.dtype.str != meta["dtype"] or list(arr.shape) != meta["shape"]:
        raise RagtuneError(f"{loc.uri}: holds {arr.dtype.str} {list(arr.shape)} but {HEADER} says {meta['dtype']} "
                           f"{meta['shape']}. {fix}")
    return arr


def _read_v1(loc: Location, sha256: str | None, fix: str) -> LexicalShard:
    """A format-1 shard (one ``.npz``, vocabulary as JSON), read into memory."""
    if not exists(loc):
        raise RagtuneError(f"{loc.uri}: lexical shard listed in the manifest is missing. {fix}")
    data = read_bytes(loc)
    if sha256 is not None and sha256_hex(data) != sha256:
        raise RagtuneError(f"{loc.uri}: checksum mismatch: the lexical shard was changed or truncated after it was "
                           f"written ({info(loc).size:,} bytes on disk). {fix}")
    try:
        import bm25s

        z = np.load(io.BytesIO(data), allow_pickle=False)
        if str(z["format"]) != LEXICAL_FORMAT_V1:
            raise ValueError(f"format {str(z['format'])!r}, expected {LEXICAL_FORMAT_V1!r}")
        params = LexicalParams.model_validate_json(str(z["params"]))
        model = bm25s.BM25(k1=params.k1, b=params.b, method=params.method)
        vocab = json.loads(z["vocab"].tobytes().decode())
        return _shard(model, z["data"], z["indices"], z["indptr"], int(z["num_docs"]), vocab, z["chunk_ids"])
    except Exception as e:  # zip, npz, JSON and pydantic errors all mean the same here
        raise RagtuneError(f"{loc.uri}: not a readable lexical shard, truncated or corrupted "
                           f"({type(e).__name__}: {str(e)[:160]}). {fix}") from None


# --- manifest part ------------------------------------------------------------------------------------------------

class LexicalRecord(BaseModel):
    file: str  # relative to the version folder: a shard folder (format 2) or an .npz (format 1)
    ntotal: int
    terms: int
    sha256: str  # of the folder's shard.json (which holds each file's sha256), or of the .npz
    bytes: int  # the whole folder
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
