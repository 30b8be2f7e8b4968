"""Schema of `ragtune finetune`: Ray Train + DeepSpeed ZeRO + PEFT LoRA."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.schema.base import Section
from configs.schema.cluster import ClusterConfig

# Why ZeRO-3 is refused with a 4-bit base (checked on the config here, on the preset's stage in jobs/finetune.py).
QLORA_ZERO3 = ("model.quantization = '4bit' with ZeRO stage 3 ({where}): partitioning a 4-bit base needs "
               "bnb_4bit_quant_storage set to the compute dtype and DeepSpeed to partition bitsandbytes' packed "
               "weights, which this job does not set up. Fix: use deepspeed.preset zero2 (the 4-bit base is replicated "
               "on every GPU: a quarter of its bf16 size, about 35 GB for 70B parameters) or model.quantization: none")


class TinyConfig(Section):
    """Shape of the built-in `tiny` model (used when model.name is tiny)."""

    layers: int = Field(2, ge=1, le=24, description="transformer layers")
    hidden: int = Field(128, ge=16, le=4096, description="hidden size (a multiple of heads)")
    heads: int = Field(4, ge=1, le=64, description="attention heads")
    vocab: int = Field(1024, ge=300, le=65536, description="BPE vocabulary trained on the training data")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyConfig:
        if self.hidden % self.heads:
            raise ValueError(f"model.tiny.hidden ({self.hidden}) must be a multiple of model.tiny.heads "
                             f"({self.heads}). Fix: e.g. hidden {self.heads * max(1, self.hidden // self.heads)}")
        return self


class ModelConfig(Section):
    """The base model."""

    name: str = Field("tiny", description="hub id, local folder, URI of a folder, or `tiny` (built locally)")
    tiny: TinyConfig = Field(default_factory=TinyConfig)
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit = QLoRA: the base in bitsandbytes NF4 (double quantized), LoRA and compute in "
                            "train.precision; GPU workers, train.method lora, ZeRO stage 0-2 (the `qlora` extra)")


class DataConfig(Section):
    """Training records: chat (`messages`) or `prompt`/`completion`, JSONL or Parquet."""

    train: str | list[str] = Field(description="JSONL/Parquet file(s) or folder; local path or URI",
                                   json_schema_extra={"storage": "input"})
    validation: str | None = Field(None, description="validation file; null = hold out validation_fraction",
                                   json_schema_extra={"storage": "input"})
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of train held out when no validation")
    template: Literal["chat", "raw"] = Field("chat", description="chat = the tokenizer's chat template; raw = text")
    max_length: int = Field(512, ge=8, description="tokens per example (longer ones are cut)")
    packing: bool = Field(False, description="pack whole examples into max_length blocks (each attends "
                                             "only to itself) instead of padding each")


class LoraConfig(Section):
    """Low-rank adapters (method: lora)."""

    r: int = Field(8, ge=1, le=1024, description="rank: higher = more capacity and memory")
    alpha: int = Field(16, ge=1, description="scale alpha / r of the adapter's update")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Linear layer names to adapt (e.g. q_proj, v_proj, lm_head); see the error for choices",
    )


class TrainConfig(Section):
    """The optimisation loop."""

    method: Literal["lora", "full"] = Field("lora", description="lora = adapters only; full = every weight")
    steps: int = Field(description="optimizer steps of the whole run (raise it to extend a finished run)", ge=1)
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    micro_batch: int = Field(4, ge=1, description="examples per worker per forward pass")
    accumulation: int = Field(1, ge=1, description="micro batches per optimizer step")
    global_batch: int | None = Field(None, ge=1, description="optional check: micro_batch x accumulation x workers")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPUs that "
                                                                                   "support it, else fp32")
    seed: int = Field(0, description="seeds LoRA init, data order and dropout")
    eval_every: int = Field(10, ge=1, description="steps between validation passes")
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints (and one at the end)")
    keep_best: int = Field(2, ge=1, description="checkpoints kept, best by eval loss (the latest is kept too)")
    stop_after_steps: int | None = Field(None, ge=1, description="stop this run at this step (continue by rerun)")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restarting from a checkpoint")
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute each layer in the backward instead of keeping its activations (~1/3 more "
                            "compute); auto = on when the memory plan's largest term is activations above 1 GiB")


class DeepSpeedConfig(Section):
    """DeepSpeed ZeRO; batch, accumulation, precision and clipping come from `train`, never from the preset."""

    enabled: bool = Field(True, description="false = plain PyTorch DDP")
    preset: str = Field("zero2", description="zero0 | zero2 | zero3 | zero3-offload, or a path to a JSON file")
    stage: Literal[0, 1, 2, 3] | None = Field(None, description="override the preset's ZeRO stage")
    offload: bool = Field(False, description="offload optimizer state to CPU memory (ZeRO 2/3)")

    @model_validator(mode="after")
    def _offload_needs_deepspeed(self) -> DeepSpeedConfig:
        if self.offload and not self.enabled:
            raise ValueError("deepspeed.offload = true needs DeepSpeed, but deepspeed.enabled = false. "
                             "Fix: enable deepspeed with a ZeRO 2/3 preset, or set offload: false")
        if self.offload and self.stage is not None and self.stage < 2:
            raise ValueError(f"deepspeed.offload = true needs ZeRO stage 2 or 3, not {self.stage}. "
                             "Fix: set deepspeed.stage to 2 or 3")
        return self


class ScalingConfig(Section):
    """Ray Train workers."""

    num_workers: int = Field(2, ge=1, description="training workers (one per GPU on GPU clusters)")
    use_gpu: bool | Literal["auto"] = Field("auto", description="auto = GPUs when the cluster has them")
    cpus_per_worker: float = Field(1, gt=0, description="Ray CPUs reserved per worker (a fraction shares a core "
                                                        "with other work, e.g. an idle serving app)")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory per GPU for the memory plan's check; "
                                                                 "null = from the driver's GPU or the node type")


class RunConfig(Section):
    """Where checkpoints and outputs go; the same name continues a stopped run."""

    name: str = Field(description="run name: rerunning it resumes from its latest checkpoint",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage_path: str = Field(description="local folder or URI for checkpoints and outputs",
                              json_schema_extra={"storage": "output"})
    merge: bool = Field(False, description="also save the base model with the adapter merged in")
    plan_only: bool = Field(False, description="print the memory plan and its check, then exit without training "
                                               "(ragtune finetune --plan)")


class MlflowConfig(Section):
    """MLflow: one MLflow run per ragtune run, continued on resume."""

    uri: str | None = Field(None, description="tracking URI (http(s)://server, databricks, file:///folder); null = "
                                              "no MLflow")
    experiment: str = Field("ragtune-finetune", min_length=1, description="MLflow experiment (made if missing)")


class WandbConfig(Section):
    """Weights & Biases: one W&B run per ragtune run, resumed by id (needs `pip install 'ragtune[wandb]'`)."""

    project: str | None = Field(None, description="W&B project; null = no W&B")
    entity: str | None = Field(None, description="W&B team or user; null = your default entity")
    group: str | None = Field(None, description="W&B group of runs (e.g. a sweep)")
    mode: Literal["online", "offline"] | None = Field(None, description="offline = write locally only "
                                                                         "(`wandb sync` later); null = WANDB_MODE "
                                                                         "or online")


class TrackingConfig(Section):
    """Experiment tracking of every step (train/loss, eval/loss, train/lr, ...): TensorBoard event files always
    (outputs/tensorboard/), MLflow and W&B when configured."""

    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class FinetuneJobConfig(Section):
    """`ragtune finetune -c FILE`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _batch_adds_up(self) -> FinetuneJobConfig:
        t, n = self.train, self.scaling.num_workers
        if t.global_batch is not None and t.global_batch != t.micro_batch * t.accumulation * n:
            raise ValueError(
                f"train.global_batch = {t.global_batch} but micro_batch x accumulation x workers = "
                f"{t.micro_batch} x {t.accumulation} x {n} = {t.micro_batch * t.accumulation * n}. Fix: set "
                f"train.accumulation to {t.global_batch / (t.micro_batch * n):g} if that is whole, or drop "
                "train.global_batch")
        if self.model.quantization == "4bit" and t.method != "lora":
            raise ValueError(f"model.quantization = '4bit' trains adapters on a frozen 4-bit base, but train.method "
                             f"= {t.method!r} would train every (quantized) weight. Fix: set train.method: lora, or "
                             "model.quantization: none")
        if self.model.quantization == "4bit" and self.deepspeed.enabled and self.deepspeed.stage == 3:
            raise ValueError(QLORA_ZERO3.format(where="deepspeed.stage = 3"))
        if t.stop_after_steps is not None and t.stop_after_steps > t.steps:
            raise ValueError(f"train.stop_after_steps ({t.stop_after_steps}) is past train.steps ({t.steps}). "
                             "Fix: lower it or leave it null")
        return self
