"""The models every part of ragtune uses: loading embedders, generators and tokenizers (a bundled alias, a local
folder, or a hub id), the device, the prompt a question is answered with (``models.prompt``), and the records a
model is fine-tuned on (``models.sft``, ``models.raft``). Nothing here imports torch at module level.
"""

from models.embedders import EmbedderSpec, load_sentence_transformer, load_tokenizer, resolve_embedder
from models.hardware import resolve_device

__all__ = ["EmbedderSpec", "load_sentence_transformer", "load_tokenizer", "resolve_device", "resolve_embedder"]
