"""Loading the models every part of ragtune uses: embedders now, generators as they arrive.

Each loader takes a bundled alias, a local folder, or a hub id; nothing here imports torch at module level.
"""

from models.embedders import EmbedderSpec, load_sentence_transformer, load_tokenizer, resolve_embedder
from models.hardware import resolve_device

__all__ = ["EmbedderSpec", "load_sentence_transformer", "load_tokenizer", "resolve_device", "resolve_embedder"]
