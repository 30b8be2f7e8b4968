"""Generators (causal LMs): load a hub id, a local folder or a folder on object storage; build the tiny preset.

The ``tiny`` preset is a small Llama-style model with a byte-level BPE tokenizer trained locally, saved as an
ordinary transformers folder (model, tokenizer, chat template), so it is loaded by exactly the code path any
local model takes. Nothing here downloads anything unless it is given a hub id and the hub is reachable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from configs.errors import RagtuneError
from sharding.storage import resolve

CACHE = Path(os.environ.get("RAGTUNE_CACHE", Path.home() / ".cache" / "ragtune"))

# Special tokens of the tiny preset; "<|end|>" ends every turn and is the EOS token, so generation stops there.
BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny preset (about 1M parameters at the defaults: trains in seconds on a laptop)."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    intermediate: int = 512
    vocab: int = 1024
    context: int = 512
    seed: int = 0


def train_tokenizer(texts: Iterable[str], vocab: int):
    """A byte-level BPE tokenizer trained on ``texts`` (any text still tokenizes: bytes are the base alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD] + [f"<|{r}|>" for r in ROLES]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(spec: TinySpec, vocab: int | None = None, **token_ids: Any):
    """The transformers config of the tiny preset (``vocab``: its tokenizer's size, default ``spec.vocab``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=spec.context, tie_word_embeddings=False, **token_ids,
    )


def build_tiny(out_dir: str | Path, texts: Iterable[str], spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny preset into ``out_dir`` (atomically: a finished folder or none). Deterministic by seed."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok = train_tokenizer(texts, spec.vocab)
    config = tiny_config(spec, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ragtune_preset.json").write_text(json.dumps({"preset": "tiny", **asdict(spec)}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def absolute_model_name(name: str) -> str:
    """``name`` as every process can read it: an existing local folder as an absolute path (Ray's workers and
    replicas run in their own working directories, where a relative folder would be taken for a hub id); hub ids
    and URIs unchanged."""
    local = Path(name).expanduser()
    return str(local.resolve()) if "://" not in name and local.exists() else name


def local_model_dir(name: str) -> str:
    """A folder the loaders can open: local folders as they are, URIs copied into a local cache once."""
    if "://" not in name:
        return name
    loc = resolve(name)
    dest = CACHE / "models" / hashlib.sha256(name.encode()).hexdigest()[:16]
    if not (dest / "config.json").is_file():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pafs.copy_files(loc.path, str(tmp), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def load_tokenizer(name: str):
    """The tokenizer of a generator (hub id, local folder or URI), with a pad token."""
    from transformers import AutoTokenizer

    path = local_model_dir(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RagtuneError(f"model {name!r}: cannot load its tokenizer ({str(e).splitlines()[0]}). Fix: pass a "
                           "local folder with tokenizer files, or a hub id that is in the local cache") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype: Any = None, quantization: str = "none"):
    """The causal LM (hub id, local folder or URI) for training or inference, in ``dtype`` (default fp32).

    ``quantization="4bit"`` (QLoRA): the base's Linear layers in bitsandbytes NF4 with double quantization,
    computing in ``dtype``, on this process's accelerator, prepared for training adapters on it (peft's
    ``prepare_model_for_kbit_training``: every base weight frozen; activation checkpointing is left to the caller).
    Needs an accelerator and bitsandbytes (the ``qlora`` extra).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = local_model_dir(name)
    kwargs: dict[str, Any] = {}
    if quantization == "4bit":
        kwargs = {"quantization_config": qlora_config(dtype or torch.bfloat16), "device_map": {"": qlora_device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise RagtuneError(f"model {name!r}: cannot load it ({str(e).splitlines()[0]}). Fix: pass a local "
                           "folder with a transformers causal LM, or a hub id that is in the local cache") from None
    if quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def qlora_config(compute_dtype: Any):
    """transformers' BitsAndBytesConfig of QLoRA: NF4 weights, double quantization (the quantization constants
    quantized too, ~0.4 bit a weight saved), matmuls in ``compute_dtype``. Built without bitsandbytes or a GPU."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def qlora_available() -> str | None:
    """Why a 4-bit base cannot be loaded in this process (None when it can): bitsandbytes missing."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed. Fix: pip install 'ragtune[qlora]' (on the GPU nodes)"
    return None


def qlora_device() -> int:
    """The index of this process's accelerator (Ray Train sets each worker's), where the 4-bit base is loaded."""
    import torch

    if (why := qlora_available()) is not None:
        raise RagtuneError(f"model.quantization = '4bit': {why}")
    if not torch.accelerator.is_available():
        raise RagtuneError("model.quantization = '4bit' needs a GPU (bitsandbytes' 4-bit kernels); this process has "
                           "none. Fix: set model.quantization: none, or train on GPU workers")
    return torch.accelerator.current_device_index()


def linear_module_names(model: Any) -> list[str]:
    """The names LoRA can target: the last component of every Linear layer's name (q_proj, lm_head, ...)."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def lora_param_count(model: Any, targets: list[str], r: int) -> int:
    """Trainable parameters LoRA with rank ``r`` on ``targets`` adds: r x (in + out) per targeted Linear."""
    import torch

    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
