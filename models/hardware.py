"""The one place that turns ``device="auto"`` into a torch device."""

from __future__ import annotations

from typing import Literal

from configs.errors import RagtuneError


def resolve_device(device: Literal["auto", "cpu", "gpu", "cuda"] = "auto"):
    """``auto`` -> the first CUDA device when torch sees one, else the CPU; ``gpu`` without one is an error."""
    import torch

    has_cuda = torch.cuda.is_available()
    if device in ("gpu", "cuda") and not has_cuda:
        raise RagtuneError(f"device = {device!r} but torch sees no CUDA GPU. Fix: use device auto or cpu")
    if device == "cpu" or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
