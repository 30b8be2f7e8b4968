"""The memory plan of a fine-tuning job: bytes per worker, predicted from the model's config and the job's settings.

Nothing is downloaded and no weight is allocated: the model is built on torch's ``meta`` device from its config
(``model_facts``), which gives the exact parameter counts (total, trainable under LoRA, the largest layer that
ZeRO-3 gathers). ``plan_memory`` turns them and the settings into the bytes one worker holds at its peak, term by
term. Symbols: P parameters, T trainable parameters (P for full fine-tuning, the adapters' for LoRA), Lp the
largest layer's parameters, N workers, w bytes per weight element (2 in bf16/fp16, 4 in fp32), B x S tokens per
micro batch (``micro_batch x max_length``: batches are padded to their longest example, so S is the bound).

Model states (per worker, ZeRO stage s; DeepSpeed's accounting, ZeRO paper section 3.1):

- **weights**: w P (s <= 2, every worker holds the whole model); w P / N + w Lp under ZeRO-3 (its partition, plus
  the largest layer gathered whole for its forward/backward). With a 4-bit base (QLoRA, ``model.quantization:
  4bit``; ZeRO <= 2 only) bitsandbytes stores the Linear layers below the output head (Q of the P parameters) in
  NF4 with double quantization: 4 bits a parameter, one 8-bit absmax per block of 64 and one fp32 constant per
  256 blocks, ``NF4_BYTES`` = 1/2 + 1/64 + 1/4096 bytes a parameter; the rest (embeddings, norms, the output head)
  is cast to fp32 by ``prepare_model_for_kbit_training``: NF4_BYTES Q + 4 (P - Q). DeepSpeed's estimators do not
  know quantized weights; the plan reports none for it.
- **gradients**: w T (s = 0; DDP without DeepSpeed: 2 w T, its buckets are copies of the gradients); w T + 4 T/N
  (s = 1: full low-precision gradients, the fp32 partition of them); (w + 4) T / N (s = 2: the reduced gradient
  partition in w bytes and its fp32 copy); 4 T / N + w Lt (s = 3: the fp32 partition, plus the gathered layer's
  gradient while it is reduce-scattered; Lt = Lp for full fine-tuning, 0 with LoRA, whose big layers are frozen).
- **optimizer**: AdamW's two moments, 8 T, and the fp32 master copy of the trained weights, 4 T. The master copy
  exists in mixed precision and under every ZeRO stage >= 1 also in fp32: DeepSpeed's ZeRO optimizers clone the
  flat fp32 partition they step (``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``), so in
  fp32 the trained weights are held twice. Only fp32 without ZeRO (s = 0) has no copy. Divided by N for s >= 1.
- With ``offload`` (ZeRO 2/3 optimizer offload) the fp32 gradients, master copy and moments live in host memory
  (``host``), not on the GPU; on a CPU-only worker host memory is the same memory, so they stay in the total.

For full fine-tuning in mixed precision these are exactly DeepSpeed's estimators
(``estimate_zero2_model_states_mem_needs``: 2 P + 18 P / N; ``estimate_zero3_model_states_mem_needs``:
4 Lp + 18 P / N; with optimizer offload 2 P and 4 Lp + 2 P / N), which the plan calls and reports beside its
own sum (``deepspeed_estimate``). They assume every weight trains in mixed precision: with LoRA the frozen
weights are counted as weights only (w P, no gradient or optimizer state) and the estimator is applied to T;
in fp32 the w-byte terms are 4 bytes. DeepSpeed has no estimator for stages 0 and 1.

Activations (what autograd keeps for the backward pass, per token and layer; Llama-style decoder layers, names
of the transformers implementation; h hidden, f intermediate, a heads, S the sequence length):

- **hidden / norms**: each RMSNorm computes in fp32 and keeps its fp32 input (4 h), and, when its weight trains,
  its normalised output (w h): two norms a layer.
- **attention**: the projections' input (w h, kept when q/k/v train: full fine-tuning or a LoRA target), q and
  k, v repeated to every head (3 w h: the job always passes a padding mask, with which transformers' sdpa path
  expands grouped k/v heads), the attention output and its log-sum-exp (w h + 4 a), and o_proj's input (w h,
  when o_proj trains). ``eager`` attention keeps the fp32 softmax probabilities instead of the log-sum-exp:
  + 4 a S a token (+ w a S more in bf16/fp16, where the probabilities are cast back), which grows with the
  sequence; ``sdpa`` (flash or memory-efficient kernels, also on CPU) keeps no S x S matrix.
- **MLP**: gate/up's input (w h, when they train), gate's output kept by SiLU, SiLU's output and up's output
  kept by the product (3 w f), and the product, down_proj's input (w f, when down_proj trains). A mixture of
  experts (k experts a token of E) keeps this for each of the k experts, plus the router's fp32 logits (4 E).
- **LoRA**: each adapted layer keeps its rank-r intermediate (w r), and with ``lora.dropout`` > 0 its dropped-out
  input (w in) and the dropout mask (1 byte x in).
- **logits**: the loss computes in fp32: log-softmax keeps its fp32 output (4 V a token), and at the start of
  the backward its gradient and the gradient of the logits exist beside it (8 V more). For vocabularies of
  100k+ tokens this 12 V bytes a token is often larger than a whole layer's activations.
- **backward working set**: below the head, the gradients of one layer's activations are in flight while the
  layer is back-propagated (counted as one layer's activations); the larger of this and the logits' gradients.
- **activation checkpointing** (non-reentrant): each layer keeps only its input (w h); in the backward one layer
  is recomputed at a time (one layer's activations) beside its gradients (the working set).

Precision: activations are kept in w bytes (bf16 on GPUs, fp32 on CPUs). The LoRA adapters are in the model's
dtype under DeepSpeed (its engine casts the module), so their inputs are not upcast.

**overhead**: DeepSpeed's communication buckets (stage 1/2: the reduce and all-gather buckets; stage 3: the
reduce and prefetch buckets; w bytes per element, from the DeepSpeed config), plus the runtime the worker starts
with: on a GPU the CUDA context, cuBLAS workspace and NCCL buffers (``GPU_RUNTIME``, ~1 GiB, outside torch's
allocator); on a CPU worker the process's resident memory before the model is built (Python, torch, DeepSpeed,
Ray: ``CPU_RUNTIME``). The benchmark measures memory above that baseline and compares the plan without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GiB = 2**30
MiB = 2**20
GPU_RUNTIME = 1 * GiB  # CUDA context (~0.5 GiB on Hopper/Ampere), cuBLAS workspaces, NCCL communicator buffers
CPU_RUNTIME = 640 * MiB  # a Ray Train worker with torch, DeepSpeed, peft, transformers imported, before the model
#                          (measured 586 MiB by bench/finetune.py: torch 2.13, DeepSpeed 0.19.8), rounded up

NF4_BYTES = 0.5 + 1 / 64 + 1 / 4096  # bytes a parameter of a 4-bit (NF4, double-quantized) Linear weight

ATTENTION_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
KNOWN_LINEARS = (*ATTENTION_IN, "o_proj", *MLP_IN, "down_proj", "lm_head")


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know of a model, read from its config and its meta-device build."""

    name: str
    params: int  # every parameter, tied ones once
    trainable: int  # parameters the job trains: all (full) or the LoRA adapters' (r x (in + out) per target)
    largest_layer: int  # parameters of the largest module (its own, not its children's): what ZeRO-3 gathers
    hidden: int
    intermediate: int  # of one expert for a mixture of experts
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0  # experts per MoE layer (0 = dense)
    experts_per_token: int = 0
    tied: bool = False
    quantizable: int = 0  # parameters of the Linear layers below the output head: what a 4-bit base quantizes


def text_config(config: Any) -> Any:
    """The language model's config (multimodal configs keep it under ``text_config``)."""
    return getattr(config, "text_config", None) or config


def model_facts(config: Any, method: Literal["lora", "full"] = "lora", targets: list[str] | None = None,
                r: int = 8, name: str = "") -> ModelFacts:
    """Count a model's parameters on the meta device (no weights allocated, nothing downloaded).

    Args:
        config: A transformers config object (e.g. ``LlamaConfig(...)``) or a hub id / local folder whose
            config.json is readable.
        method: ``lora`` counts the adapters as trainable, ``full`` every parameter.
        targets: LoRA's target module names (``lora.target_modules``).
        r: LoRA's rank.
        name: How the plan names the model (default: the config's ``_name_or_path`` or model type).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.generators import lora_param_count

    if isinstance(config, str):
        from models.generators import local_model_dir

        name = name or config
        config = AutoConfig.from_pretrained(local_model_dir(config))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    trainable = params if method == "full" else lora_param_count(model, list(targets or []), r)
    head = model.get_output_embeddings()
    quantizable = sum(p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear) and mod is not head
                      for p in mod.parameters(recurse=False))
    c = text_config(config)
    heads = c.num_attention_heads
    return ModelFacts(
        name=name or getattr(config, "_name_or_path", "") or c.model_type, params=params, trainable=trainable,
        largest_layer=largest, hidden=c.hidden_size, intermediate=c.intermediate_size, layers=c.num_hidden_layers,
        heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
        experts=getattr(c, "num_local_experts", 0) or getattr(c, "num_experts", 0) or 0,
        experts_per_token=getattr(c, "num_experts_per_tok", 0) or 0,
        tied=bool(getattr(config, "tie_word_embeddings", False)), quantizable=quantizable)


@dataclass(frozen=True)
class TrainSettings:
    """The job settings the plan depends on (from ``FinetuneJobConfig`` and the training plan)."""

    method: Literal["lora", "full"] = "lora"
    stage: int = 2  # ZeRO stage 0-3
    deepspeed: bool = True  # False: plain DDP
    offload: bool = False  # optimizer state offloaded to host memory (ZeRO 2/3)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    micro_batch: int = 4
    max_length: int = 512
    checkpointing: bool = False
    workers: int = 1
    device: Literal["gpu", "cpu"] = "gpu"
    attention: Literal["sdpa", "eager"] = "sdpa"
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # LoRA's
    r: int = 8
    dropout: float = 0.0  # LoRA's
    buckets: int = 0  # elements of DeepSpeed's communication buckets (reduce + all-gather or prefetch); 0 = h^2 each
    quantization: Literal["none", "4bit"] = "none"  # model.quantization: 4bit = a QLoRA base (ZeRO <= 2)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted bytes one worker holds at its peak, by term (see the module docstring for each)."""

    facts: ModelFacts
    settings: TrainSettings
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int  # DeepSpeed's buckets + the runtime (GPU_RUNTIME or CPU_RUNTIME)
    runtime: int  # the part of ``overhead`` that is the process's baseline (context / interpreter)
    host: int = 0  # bytes offloaded to host memory per worker (not in ``total`` on GPUs)
    activation_parts: dict[str, int] = field(default_factory=dict)
    deepspeed_estimate: int | None = None  # DeepSpeed's own estimator of the model states, where it applies

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        """The predicted peak per worker (device memory on GPUs, resident memory on CPUs)."""
        return self.model_states + self.activations + self.overhead

    @property
    def above_baseline(self) -> int:
        """The peak less the runtime the process starts with (what the benchmark measures)."""
        return self.total - self.runtime

    def terms(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "overhead": self.overhead}

    @property
    def dominant(self) -> str:
        """The largest of weights, gradients, optimizer and activations (what the job's settings change; the
        overhead is mostly the fixed runtime)."""
        return max((kv for kv in self.terms().items() if kv[0] != "overhead"), key=lambda kv: kv[1])[0]

    def lines(self) -> list[str]:
        """The plan as text: settings, one line per term (the dominant one marked), the total."""
        f, s = self.facts, self.settings
        where = "GPU" if s.device == "gpu" else "CPU worker (resident memory)"
        ds = f"ZeRO-{s.stage}" if s.deepspeed else "DDP (no DeepSpeed)"
        train = (f"LoRA r={s.r} on {', '.join(s.targets)}: {f.trainable:,} trainable" if s.method == "lora"
                 else f"full: {f.trainable:,} trainable")
        out = [f"memory plan: {f.name}, {f.params / 1e9:.3g}B parameters ({f.layers} layers x {f.hidden}, vocab "
               f"{f.vocab:,}); {train}",
               f"  {s.workers} worker(s), {ds}{' + optimizer offload' if s.offload else ''}, {s.precision}, "
               f"micro batch {s.micro_batch} x {s.max_length} tokens, activation checkpointing "
               f"{'on' if s.checkpointing else 'off'}, {s.attention} attention"]
        for name, value in self.terms().items():
            note = {"activations": ", ".join(f"{k} {_gib(v)}" for k, v in self.activation_parts.items()),
                    "overhead": f"runtime {_gib(self.runtime)}, buckets {_gib(self.overhead - self.runtime)}"}.get(name)
            mark = "  <- dominant" if name == self.dominant else ""
            out.append(f"  {name:<12}{_gib(value):>12}{f'  ({note})' if note else ''}{mark}")
        out.append(f"  {'total':<12}{_gib(self.total):>12}  per {where}; {_gib(self.above_baseline)} above the "
                   "runtime baseline")
        if self.host:
            out.append(f"  offloaded   {_gib(self.host):>12}  of host memory per worker")
        if self.deepspeed_estimate is not None:
            out.append(f"  DeepSpeed's estimator of the model states: {_gib(self.deepspeed_estimate)} "
                       f"(this plan: {_gib(self.model_states)})")
        return out

    def table(self) -> str:
        return "\n".join(self.lines())


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def activation_bytes(f: ModelFacts, s: TrainSettings) -> dict[str, int]:
    """Activation bytes of one worker's micro batch at the start of the backward pass, by part (module docstring).

    Returns ``{"layers": ..., "logits": ..., "working": ...}`` (and ``"recompute"`` with checkpointing): the
    layers' kept tensors, the head's (final norm and fp32 log-probabilities), and the backward's working set.
    """
    w = 2 if s.precision in ("bf16", "fp16") else 4
    h, ff, a = f.hidden, f.intermediate, f.heads
    qdim = a * f.head_dim
    full = s.method == "full"
    unknown = any(t not in KNOWN_LINEARS for t in s.targets)  # another architecture's names: assume all kept

    def trains(names: tuple[str, ...]) -> bool:
        return full or unknown or any(n in s.targets for n in names)

    norm = 4 * h + (w * h if full else 0)
    attention = (w * h if trains(ATTENTION_IN) else 0) + 3 * w * qdim + w * qdim + 4 * a \
        + (w * qdim if trains(("o_proj",)) else 0)
    if s.attention == "eager":
        attention += 4 * a * s.max_length + (w * a * s.max_length if w != 4 else 0) - 4 * a
    mlp = (w * h if trains(MLP_IN) else 0) + 3 * w * ff + (w * ff if trains(("down_proj",)) else 0)
    if f.experts:  # each of the k routed experts keeps its own copy of its tokens and its MLP; the router's logits
        mlp = f.experts_per_token * mlp + 4 * f.experts
    lora = 0
    if s.method == "lora":
        ins = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": qdim, "gate_proj": h, "up_proj": h, "down_proj": ff}
        for t in s.targets:
            if t in ins:
                lora += w * s.r + ((w + 1) * ins[t] if s.dropout > 0 else 0)
    per_layer = 2 * norm + attention + mlp + lora  # bytes a token
    tokens = s.micro_batch * s.max_length
    head = norm + 4 * f.vocab  # the final norm; log-softmax's fp32 output
    working = max(8 * f.vocab, per_layer)  # the logits' fp32 gradients, or one layer's activation gradients
    if s.checkpointing:
        parts = {"layers": tokens * f.layers * w * h, "recompute": tokens * per_layer}
    else:
        parts = {"layers": tokens * f.layers * per_layer}
    parts["logits"] = tokens * head
    parts["working"] = tokens * working
    return parts


def plan_memory(f: ModelFacts, s: TrainSettings) -> MemoryPlan:
    """The memory one worker needs at its peak, by term (module docstring), for ``f`` trained as ``s`` says."""
    w = 2 if s.precision in ("bf16", "fp16") else 4
    mixed = w == 2
    P, T, N, Lp = f.params, f.trainable, s.workers, f.largest_layer
    stage = s.stage if s.deepspeed else 0
    Lt = Lp if s.method == "full" else 0
    on_host = s.offload and stage >= 2
    # weights
    weights = w * P if stage < 3 else math.ceil(w * P / N) + w * Lp
    if s.quantization == "4bit":  # NF4 Linear weights, the rest in fp32 (prepare_model_for_kbit_training)
        weights = math.ceil(NF4_BYTES * f.quantizable) + 4 * (P - f.quantizable)
    # gradients: the w-byte ones (device) and the fp32 partition (device, or host with offload)
    grads_low = {0: w * T * (1 if s.deepspeed else 2), 1: w * T, 2: math.ceil(w * T / N), 3: w * Lt}[stage]
    grads_fp32 = 0 if stage == 0 else math.ceil(4 * T / N)
    if on_host and stage == 2:  # offloaded ZeRO-2 copies each reduced bucket to the host's fp32 partition
        grads_low = 0
    # optimizer: AdamW moments + the fp32 master copy (module docstring)
    master = (4 * T if mixed else 0) if stage == 0 else math.ceil(4 * T / N)
    moments = 8 * T if stage == 0 else math.ceil(8 * T / N)
    gradients, optimizer, host = grads_low + grads_fp32, master + moments, 0
    if on_host:
        host = grads_fp32 + master + moments
        if s.device == "gpu":
            gradients, optimizer = grads_low, 0
    parts = activation_bytes(f, s)
    bucket = s.buckets or (2 * f.hidden**2 if stage >= 1 and s.deepspeed else 0)
    runtime = GPU_RUNTIME if s.device == "gpu" else CPU_RUNTIME
    estimate = None
    if s.deepspeed and stage in (2, 3) and s.device == "gpu" and s.quantization == "none":
        estimate = deepspeed_model_states(f, stage, N, s.offload, w)
    return MemoryPlan(facts=f, settings=s, weights=weights, gradients=gradients, optimizer=optimizer,
                      activations=sum(parts.values()), overhead=w * bucket + runtime, runtime=runtime, host=host,
                      activation_parts=parts, deepspeed_estimate=estimate)


def deepspeed_model_states(f: ModelFacts, stage: int, workers: int, offload: bool, w: int = 2) -> int:
    """DeepSpeed's own estimate of the model states per GPU (bytes), for one node of ``workers`` GPUs: its
    estimator applied to the trainable parameters, plus the frozen weights (which it does not know of) in ``w``
    bytes, partitioned under ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    T, frozen = f.trainable, f.params - f.trainable
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(T, num_gpus_per_node=workers, cpu_offload=offload)
        return gpu + w * frozen
    _, gpu, _ = estimate_zero3_model_states_mem_needs(T, f.largest_layer, num_gpus_per_node=workers,
                                                      cpu_offload=offload, cpu_offload_params=False)
    return gpu + math.ceil(w * frozen / workers)


def with_changes(f: ModelFacts, s: TrainSettings, **changes: Any) -> MemoryPlan:
    """The plan with some settings changed (what a suggested fix would give)."""
    return plan_memory(f, replace(s, **changes))


def fixes(f: ModelFacts, s: TrainSettings, available: int, more_workers: int | None = None) -> list[str]:
    """The changes that make the plan fit in ``available`` bytes per worker, each found by re-running the plan
    with it, cheapest first by what it costs: activation checkpointing (~1/3 more compute) and a higher ZeRO stage
    (more communication), then both, then optimizer offload (the optimizer step on the host), then a smaller
    micro batch or a shorter ``data.max_length`` (the largest that fits), then more workers (the fewest that fit).

    Args:
        more_workers: How many workers the cluster could run at most (None: don't suggest more workers).
    """
    candidates: list[list[tuple[str, dict[str, Any]]]] = []  # groups: from each, the first change that fits
    if not s.checkpointing:
        candidates.append([("train.activation_checkpointing=true", {"checkpointing": True})])
    if s.deepspeed:
        candidates.append([(f"deepspeed.stage={st}", {"stage": st}) for st in range(s.stage + 1, 4)])
        if not s.checkpointing and s.stage < 3:
            candidates.append([("deepspeed.stage=3 train.activation_checkpointing=true",
                                {"stage": 3, "checkpointing": True})])
        if not s.offload:
            candidates.append([(f"deepspeed.stage={st} deepspeed.offload=true" if st != s.stage
                                else "deepspeed.offload=true", {"stage": st, "offload": True})
                               for st in range(max(2, s.stage), 4)])
    candidates.append([(f"train.micro_batch={mb} (raise train.accumulation to keep the batch)", {"micro_batch": mb})
                       for mb in range(s.micro_batch - 1, 0, -1)])
    candidates.append([(f"data.max_length={n}", {"max_length": n})
                       for n in (s.max_length * 3 // 4, s.max_length // 2, s.max_length // 4) if n >= 64])
    if more_workers and s.deepspeed and s.stage >= 1:
        candidates.append([(f"scaling.num_workers={n}", {"workers": n})
                           for n in range(s.workers + 1, more_workers + 1)])
    out = []
    for group in candidates:
        for fix, change in group:
            plan = with_changes(f, s, **change)
            if plan.total <= available:
                out.append(f"{fix} ({_gib(plan.total)})")
                break
    return out
