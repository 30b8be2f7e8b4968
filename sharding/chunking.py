"""Token-aware chunking with the embedding model's own tokenizer.

A document becomes windows of at most ``size`` tokens (the title, when prepended, counts towards them),
consecutive windows sharing ``overlap`` tokens. Windows end at word boundaries where the window allows, and
every chunk is checked against the tokenizer once more, so an embedder never truncates a chunk. A chunk's text
is the exact slice of the document between its first and last token.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Protocol

CHUNKER_VERSION = 1
TITLE_SEP = "\n"


class Encoding(Protocol):
    ids: list[int]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]


class Tokenizer(Protocol):
    """What chunking needs of a tokenizer: the ``tokenizers.Tokenizer`` interface."""

    def encode(self, sequence: str, add_special_tokens: bool = True) -> Encoding: ...


@dataclass(frozen=True)
class ChunkerSettings:
    """Everything that changes which chunks a corpus gives; its fingerprint goes into every chunk id."""

    size: int
    overlap: int
    prepend_title: bool
    tokenizer: str  # the revision of the model the tokenizer comes from
    version: int = CHUNKER_VERSION

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint": self.fingerprint()}


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str  # the document's text between the first and last token of the window
    start: int  # character offsets into the document text
    end: int
    n_tokens: int  # tokens of embed_input(title, text), without special tokens


def embed_input(title: str | None, text: str, prepend_title: bool = True) -> str:
    """The string the embedding model sees for a chunk."""
    return f"{title}{TITLE_SEP}{text}" if (prepend_title and title) else text


def count_special_tokens(tokenizer: Tokenizer) -> int:
    """Tokens the tokenizer adds around one sequence (2 for BERT's [CLS] ... [SEP])."""
    return len(tokenizer.encode("", add_special_tokens=True).ids)


class Chunker:
    """Cuts documents into token windows. Pure: the same text and settings always give the same chunks."""

    def __init__(self, tokenizer: Tokenizer, size: int, overlap: int, prepend_title: bool = True):
        if size < 8:
            raise ValueError(f"chunk size must be at least 8 tokens, got {size}")
        if not 0 <= overlap < size:
            raise ValueError(f"chunk overlap must be in [0, size), got {overlap} with size {size}")
        self.tok = tokenizer
        self.size = size
        self.overlap = overlap
        self.prepend_title = prepend_title

    def _n_tokens(self, s: str) -> int:
        return len(self.tok.encode(s, add_special_tokens=False).ids)

    def _title(self, title: str | None) -> str | None:
        """The title as prepended: cut to half the window so that a long title leaves room for text."""
        if not (self.prepend_title and title and title.strip()):
            return None
        title = title.strip()
        enc = self.tok.encode(title, add_special_tokens=False)
        limit = self.size // 2
        if len(enc.ids) > limit:
            title = title[: enc.offsets[limit - 1][1]]
        return title

    def chunk(self, text: str | None, title: str | None = None) -> list[Chunk]:
        """Chunks of one document; an empty or whitespace-only text gives none."""
        if not text or not text.strip():
            return []
        title = self._title(title)
        enc = self.tok.encode(text, add_special_tokens=False)
        offsets, words = enc.offsets, enc.word_ids
        n = len(enc.ids)
        if n == 0:
            return []
        budget = self.size - (self._n_tokens(title + TITLE_SEP) if title else 0)
        budget = max(budget, 1)
        overlap = min(self.overlap, budget // 2)

        def same_word(i: int) -> bool:  # token i continues the word of token i-1
            return 0 < i < n and words[i] is not None and words[i] == words[i - 1]

        chunks: list[Chunk] = []
        start = 0
        while True:
            end = min(start + budget, n)
            if end < n and same_word(end):  # do not cut inside a word unless the word fills the window
                cut = end
                while cut > start + 1 and same_word(cut):
                    cut -= 1
                if not same_word(cut):
                    end = cut
            while True:  # the joined title + text may tokenize longer than its parts: shrink until it fits
                body = text[offsets[start][0] : offsets[end - 1][1]]
                n_tok = self._n_tokens(embed_input(title, body, self.prepend_title))
                if n_tok <= self.size or end - start <= 1:
                    break
                end = max(start + 1, end - (n_tok - self.size))
            chunks.append(Chunk(len(chunks), body, offsets[start][0], offsets[end - 1][1], n_tok))
            if end >= n:
                return chunks
            nxt = end - overlap
            while nxt < end and same_word(nxt):  # start the next window at a word
                nxt += 1
            start = max(nxt, start + 1)
