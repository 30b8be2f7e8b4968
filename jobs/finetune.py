"""`ragtune finetune`: LoRA (or full) fine-tuning on Ray Train with DeepSpeed ZeRO, checkpoints and resume.

Laptop (embedded local Ray, 2 CPU workers, the built-in tiny model)::

    ragtune finetune -c configs/finetune/tiny.yaml
    ragtune finetune -c configs/finetune/tiny.yaml deepspeed.preset=zero3 train.steps=60   # extend the run

Cluster::

    ray job submit --working-dir . -- python -m jobs.finetune --config configs/finetune/llama-lora.yaml

The flow, top to bottom:
1. check the config and the data files (no Ray, no torch), and plan the workers from the cluster's resources;
2. resolve the base model (the `tiny` preset is built once per run, from the training data, into the run folder);
3. read the records with Ray Data, split off validation by a stable hash, tokenize with the chat template and
   the loss masked to the answers, shuffle once by seed; each worker gets its own shard of the train split;
4. every worker: model + LoRA (seeded, so every rank starts alike) -> ``deepspeed.initialize`` with a DeepSpeed
   dict built from the job config and a preset -> resume from the latest checkpoint if there is one -> the loop,
   with validation, metrics (rank 0: every step to TensorBoard, MLflow, W&B: jobs/tracking.py) and a checkpoint
   every N steps (``ray.train.report``, best K by eval loss kept);
5. rank 0 saves the adapter (gathered first under ZeRO-3) and the metrics; the driver adds the resolved config,
   the loss curve, optionally the merged model, and prints a summary line.

Rerunning the same ``run.name`` continues from its latest checkpoint (a stopped run, or a finished one whose
``train.steps`` was raised); a worker that dies is restarted by Ray Train from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pyarrow as pa
import pyarrow.fs as pafs

from cluster.placement import NodeResources, TrainPlan, plan_training
from cluster.runtime import Stopped, alive_nodes, init_ray
from configs import CONFIG_DIR
from configs.errors import RagtuneError
from configs.schema import FinetuneJobConfig
from configs.schema.finetune import QLORA_ZERO3
from jobs import console, tracking
from jobs.commands import job_main
from jobs.plots import png, pyplot
from jobs.progress import ensure_logging
from models.generators import (
    TinySpec,
    absolute_model_name,
    build_tiny,
    linear_module_names,
    load_model,
    load_tokenizer,
    local_model_dir,
    lora_param_count,
    qlora_available,
    tiny_config,
)
from models.memory import GiB, MemoryPlan, TrainSettings, fixes, model_facts, plan_memory
from models.sft import (
    IGNORE,
    Block,
    Example,
    encode_record,
    flatten_blocks,
    is_validation,
    pack,
    pad_batch,
    pad_blocks,
    to_messages,
)
from sharding.corpus import CorpusError, list_corpus
from sharding.storage import Location, atomic_write_bytes, exists, resolve

if TYPE_CHECKING:
    from ray.train import Result, UserCallback

log = logging.getLogger("ragtune.finetune")

DEEPSPEED_PRESETS = CONFIG_DIR / "deepspeed"
# Keys the job config owns (one source of truth: DeepSpeed reads them from the job config); a preset that sets
# them is overwritten, with a warning.
JOB_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


# --- 1. checks before any work ------------------------------------------------------------------------------------

def load_preset(preset: str) -> dict[str, Any]:
    """A DeepSpeed preset by name (configs/deepspeed/<name>.json) or path."""
    path = Path(preset) if preset.endswith(".json") or "/" in preset else DEEPSPEED_PRESETS / f"{preset}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DEEPSPEED_PRESETS.glob("*.json"))
        raise RagtuneError(f"deepspeed.preset = {preset!r}: no such preset. Fix: use one of {', '.join(names)} "
                           "or a path to a DeepSpeed JSON file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RagtuneError(f"deepspeed.preset {path}: not valid JSON ({e})") from None


def deepspeed_config(cfg: FinetuneJobConfig, world: int, precision: str, on_gpu: bool,
                     hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed dict: the preset, with every value the job config owns written in from the job config.

    Bucket sizes a preset leaves ``auto`` follow the model's hidden size h as transformers' integration sets them
    (reduce and all-gather buckets h^2, ZeRO-3 prefetch 0.9 h^2, persistence threshold 10 h): fixed buckets of
    tens of millions of elements would hold most of a small model twice and hide ZeRO's savings.
    """
    ds = load_preset(cfg.deepspeed.preset)
    overridden = [k for k in JOB_OWNED if k in ds]
    if overridden:
        log.warning("deepspeed preset %s sets %s; the job config owns them and overrides", cfg.deepspeed.preset,
                    ", ".join(overridden))
    t = cfg.train
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.deepspeed.stage is not None:
        zero["stage"] = cfg.deepspeed.stage
    if cfg.deepspeed.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    auto = {"reduce_bucket_size": 1.0, "allgather_bucket_size": 1.0, "stage3_prefetch_bucket_size": 0.9}
    for key, value in list(zero.items()):
        if value != "auto":
            continue
        if hidden_size is None:
            raise RagtuneError(f"deepspeed preset: zero_optimization.{key} is auto but the model's hidden size is "
                               "unknown. Fix: give the value in the preset")
        zero[key] = 10 * hidden_size if key == "stage3_param_persistence_threshold" else int(auto.get(key, 1.0)
                                                                                              * hidden_size**2)
    if zero.get("offload_optimizer") and zero.get("stage", 0) < 2:
        raise RagtuneError(f"deepspeed: optimizer offload needs ZeRO stage 2 or 3, the config gives stage "
                           f"{zero.get('stage', 0)}. Fix: set deepspeed.stage to 2 or 3")
    ds.update({
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.accumulation,
        "train_batch_size": t.micro_batch * t.accumulation * world,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    })
    for k in ("optimizer", "scheduler"):
        ds.pop(k, None)
    if on_gpu:  # DeepSpeed's fused AdamW on GPUs; on CPU the job passes torch.optim.AdamW (no op compile)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay}}
    else:
        ds["zero_force_ds_cpu_optimizer"] = False  # offload with a client AdamW on a CPU-only cluster
    return ds


def check(cfg: FinetuneJobConfig) -> None:
    """Everything that can fail before work starts, without Ray or torch: preset, data files."""
    if cfg.deepspeed.enabled:
        load_preset(cfg.deepspeed.preset)
    tracking.check(cfg)
    for key, paths in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        if paths is None:
            continue
        try:
            corpus = list_corpus(paths)
        except CorpusError as e:
            raise RagtuneError(str(e).replace("corpus.path", key)) from None
        bad = [f.uri for f in corpus.files if f.kind == "text"]
        if bad:
            raise RagtuneError(f"{key}: {bad[0]} is a text file; training data is JSONL or Parquet records "
                               "with `messages` or `prompt`/`completion`")
        for f in corpus.of_kind("jsonl"):
            first = _first_record(corpus.fs, f.path)
            if first is not None and "messages" not in first and not {"prompt", "completion"} <= set(first):
                raise RagtuneError(f"{key}: {f.uri}: the first record has neither `messages` nor `prompt` and "
                                   f"`completion` (fields: {', '.join(first)}). Fix: convert the data")


def check_quantization(cfg: FinetuneJobConfig, plan: TrainPlan) -> None:
    """A 4-bit base (QLoRA) needs GPU workers, bitsandbytes and ZeRO stage 0-2: refused before any worker starts.
    (train.method and deepspeed.stage are checked with the config; here the plan, the package and the preset.)"""
    if cfg.model.quantization == "none":
        return
    if not plan.use_gpu:
        raise RagtuneError(f"model.quantization = {cfg.model.quantization!r} needs GPU workers (bitsandbytes' 4-bit "
                           f"kernels), but this run trains on CPUs ({plan.reason}). Fix: set model.quantization: none, "
                           "or run on a cluster with GPUs (scaling.use_gpu: auto)")
    if (why := qlora_available()) is not None:
        raise RagtuneError(f"model.quantization = {cfg.model.quantization!r}: {why}")
    if cfg.deepspeed.enabled:
        stage = cfg.deepspeed.stage
        if stage is None:
            stage = load_preset(cfg.deepspeed.preset).get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise RagtuneError(QLORA_ZERO3.format(where=f"deepspeed.preset = {cfg.deepspeed.preset!r}"))


def _first_record(fs: Any, path: str) -> dict[str, Any] | None:
    with fs.open_input_stream(path) as s:
        for line in s.read(1 << 20).decode("utf-8", "replace").splitlines():
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    raise RagtuneError(f"{path}: the first line is not JSON. Fix: one JSON object per line") from None
    return None


# --- 1b. the memory plan (driver) -----------------------------------------------------------------------------------

AUTO_CHECKPOINTING_ABOVE = 1 * GiB  # train.activation_checkpointing auto: on when activations dominate above this
# Memory per GPU of Ray's accelerator types, where the type has one size (A100 and V100 come in two: not guessed)
GPU_MEMORY_GIB = {"H100": 80, "H200": 141, "A10G": 24, "L4": 24, "L40S": 48, "T4": 16, "A10": 24, "B200": 180}


def tiny_spec(cfg: FinetuneJobConfig) -> TinySpec:
    """The shape of the ``tiny`` preset this job builds (``model.tiny``)."""
    t = cfg.model.tiny
    return TinySpec(layers=t.layers, hidden=t.hidden, heads=t.heads, intermediate=4 * t.hidden, vocab=t.vocab,
                    seed=cfg.train.seed)


def base_model_config(cfg: FinetuneJobConfig) -> Any:
    """The base model's transformers config, read without its weights: a local folder's or a hub id's config.json
    (the hub sends that file alone), a URI's config.json, or the ``tiny`` preset's (its run folder's once built)."""
    from transformers import AutoConfig

    name = cfg.model.name
    if name == "tiny":
        built = resolve(cfg.run.storage_path).join(cfg.run.name, "base_model", "config.json")
        if not exists(built):
            return tiny_config(tiny_spec(cfg))
        name = built.portable.rsplit("/", 1)[0]
    if "://" in name:
        loc = resolve(name).join("config.json")
        with loc.fs.open_input_stream(loc.path) as f:
            values = json.loads(f.read())
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(absolute_model_name(name))
    except (OSError, ValueError) as e:
        raise RagtuneError(f"model.name = {name!r}: cannot read its config.json for the memory plan "
                           f"({str(e).splitlines()[0]}). Fix: a local folder, a URI or a hub id in the local cache"
                           ) from None


def memory_plan(cfg: FinetuneJobConfig, plan: TrainPlan) -> MemoryPlan:
    """The job's memory plan per worker (models.memory), with ``train.activation_checkpointing: auto`` decided:
    on when the plan without it has activations as its largest term and above ``AUTO_CHECKPOINTING_ABOVE`` (the
    demo's tiny models, whose activations are a few MiB, stay without it: recomputing costs ~1/3 more compute)."""
    config = base_model_config(cfg)
    facts = model_facts(config, cfg.train.method, cfg.lora.target_modules, cfg.lora.r,
                        name="tiny" if cfg.model.name == "tiny" else cfg.model.name)
    ds = deepspeed_config(cfg, plan.num_workers, plan.precision, plan.use_gpu, facts.hidden) \
        if cfg.deepspeed.enabled else None
    zero = (ds or {}).get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    buckets = sum(int(zero.get(k, 0)) for k in (("reduce_bucket_size", "stage3_prefetch_bucket_size") if stage == 3
                                                 else ("reduce_bucket_size", "allgather_bucket_size")))
    attention = getattr(config, "_attn_implementation", None)
    settings = TrainSettings(
        method=cfg.train.method, stage=stage, deepspeed=ds is not None, offload=bool(zero.get("offload_optimizer")),
        precision=plan.precision, micro_batch=cfg.train.micro_batch, max_length=cfg.data.max_length,
        checkpointing=cfg.train.activation_checkpointing is True, workers=plan.num_workers,
        device="gpu" if plan.use_gpu else "cpu", attention="eager" if attention == "eager" else "sdpa",
        targets=tuple(cfg.lora.target_modules), r=cfg.lora.r, dropout=cfg.lora.dropout,
        buckets=buckets if stage >= 1 else 0, quantization=cfg.model.quantization)
    mem = plan_memory(facts, settings)
    if cfg.train.activation_checkpointing == "auto" and mem.dominant == "activations" \
            and mem.activations > AUTO_CHECKPOINTING_ABOVE:
        mem = plan_memory(facts, replace(settings, checkpointing=True))
    return mem


def worker_memory(cfg: FinetuneJobConfig, plan: TrainPlan, nodes: list[NodeResources]) -> tuple[int | None, str]:
    """(bytes each worker may use, where the figure comes from); None when unknown.

    GPUs: ``scaling.gpu_memory_gib``, else the driver's own GPU (``torch.cuda``), else the nodes' Ray accelerator
    type (Ray's resources have no GPU memory). CPUs: the Ray ``memory`` of the node that packs the most workers,
    divided among them (Ray Train packs a worker group onto as few nodes as it can).
    """
    if plan.use_gpu:
        if cfg.scaling.gpu_memory_gib:
            return int(cfg.scaling.gpu_memory_gib * GiB), f"scaling.gpu_memory_gib = {cfg.scaling.gpu_memory_gib:g}"
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return int(p.total_memory), f"a {p.name} (the driver's GPU)"
        import ray

        types = {k.split(":", 1)[1] for n in ray.nodes() if n.get("Alive") for k in n.get("Resources", {})
                 if k.startswith("accelerator_type:")}
        known = [GPU_MEMORY_GIB[t] for t in types if t in GPU_MEMORY_GIB]
        if types and len(known) == len(types):
            return int(min(known) * GiB), f"a {'/'.join(sorted(types))} GPU ({min(known)} GiB)"
        return None, (f"GPU memory unknown (accelerator types: {', '.join(sorted(types)) or 'none reported'}): set "
                      "scaling.gpu_memory_gib to check the plan")
    packed = [(n, min(plan.num_workers, max(1, int(n.cpus // cfg.scaling.cpus_per_worker))))
              for n in nodes if n.cpus >= cfg.scaling.cpus_per_worker and n.memory > 0]  # (node, its workers)
    if not packed:
        return None, "node memory unknown"
    node, k = min(packed, key=lambda x: x[0].memory / x[1])
    return int(node.memory / k), f"{node.memory / GiB:.1f} GiB of Ray memory on a node, shared by {k} worker(s)"


def check_memory(cfg: FinetuneJobConfig, plan: TrainPlan, mem: MemoryPlan, nodes: list[NodeResources]) -> str:
    """A line that says the plan fits, or a RagtuneError naming predicted vs available and the fixes that fit
    (each a re-run of the plan with one change)."""
    available, where = worker_memory(cfg, plan, nodes)
    unit = "GPU" if plan.use_gpu else "worker"
    if available is None:
        return f"memory plan: {mem.total / GiB:.2f} GiB per {unit}, not checked: {where}"
    if mem.total <= available:
        return f"memory plan: {mem.total / GiB:.2f} GiB per {unit} fits {available / GiB:.2f} GiB ({where})"
    more = int(sum(n.gpus for n in nodes)) if plan.use_gpu else None
    found = fixes(mem.facts, mem.settings, available, more_workers=more)
    raise RagtuneError(
        f"the memory plan predicts {mem.total / GiB:.2f} GiB per {unit} at its peak ({mem.dominant} "
        f"{getattr(mem, mem.dominant) / GiB:.2f} GiB is the largest term) but {where} gives "
        f"{available / GiB:.2f} GiB. Fix: "
        + ("; or ".join(found[:5]) if found else "a larger machine, or a smaller model / shorter data.max_length")
        + " (`ragtune finetune --plan` prints the plan)")


def preflight(cfg: FinetuneJobConfig, say: Any = log.info) -> tuple[FinetuneJobConfig, TrainPlan, MemoryPlan]:
    """Check the config, plan the workers and their memory, say the plan, and refuse a job that will not fit.
    Returns the config with ``train.activation_checkpointing`` resolved (what the workers and config.json see)."""
    check(cfg)
    init_ray(cfg.cluster)
    nodes = alive_nodes()
    plan = plan_training(nodes, cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker,
                         cfg.train.precision)
    say(plan.reason)
    check_quantization(cfg, plan)
    mem = memory_plan(cfg, plan)
    say(mem.table())
    say(check_memory(cfg, plan, mem, nodes))
    resolved = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"activation_checkpointing": mem.settings.checkpointing})})
    return resolved, plan, mem


# --- 2/3. base model and data (driver) -----------------------------------------------------------------------------

def read_records(paths: str | list[str]):
    """A Ray Dataset of the records in JSONL/Parquet files."""
    import ray.data

    corpus = list_corpus(paths)
    parts = []
    if jsonl := corpus.of_kind("jsonl"):
        parts.append(ray.data.read_json([f.path for f in jsonl], filesystem=corpus.fs, file_extensions=None))
    if parquet := corpus.of_kind("parquet"):
        parts.append(ray.data.read_parquet([f.path for f in parquet], filesystem=corpus.fs, file_extensions=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _record_text(r: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in to_messages(r))


def resolve_base_model(cfg: FinetuneJobConfig, records) -> str:
    """The base model every worker loads: the configured one, or the tiny preset built into the run folder.
    A local folder is made absolute: Ray's workers do not run in this process's working directory."""
    if cfg.model.name != "tiny":
        return absolute_model_name(cfg.model.name)
    dest = resolve(cfg.run.storage_path).join(cfg.run.name, "base_model")
    if exists(dest.join("config.json")):  # a rerun of the run keeps its base model (and tokenizer)
        return dest.portable
    t = cfg.model.tiny
    spec = tiny_spec(cfg)
    texts = [_record_text(r) for r in records.iter_rows()]
    log.info("building the tiny base model (%d layers x %d) with a tokenizer trained on %d records", t.layers,
             t.hidden, len(texts))
    with tempfile.TemporaryDirectory() as tmp:
        local = build_tiny(Path(tmp) / "tiny", texts, spec)
        dest.fs.create_dir(dest.path, recursive=True)
        pafs.copy_files(str(local), dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    return dest.portable


def hidden_size(base: str) -> int | None:
    """The model's hidden size, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(local_model_dir(base))
    config = getattr(config, "text_config", None) or config
    return getattr(config, "hidden_size", None)


def _tokenize(batch: pa.Table, base: str, max_len: int, template: str, packing: bool) -> dict[str, Any]:
    tok = _cached(load_tokenizer, base)
    examples = [encode_record(tok, r, max_len, template, where=f"record {r.get('id', i)}")
                for i, r in enumerate(batch.to_pylist())]
    for i, (r, e) in enumerate(zip(batch.to_pylist(), examples, strict=True)):
        if e.n_label_tokens == 0:  # cut before its answer: it would train on nothing, silently
            full = encode_record(tok, r, 1 << 20, template)
            first = next(j for j, label in enumerate(full.labels) if label != -100)
            raise RagtuneError(f"record {r.get('id', i)}: its answer starts at token {first}, past data.max_length = "
                               f"{max_len}, so nothing of it would be learned. Fix: raise data.max_length to at least "
                               f"{len(full.input_ids)} (this record's length), or shorten the prompts")
    if packing:  # blocks keep each example's boundaries in position_ids, through Ray Data to the collate
        blocks = pack(examples, max_len)
        return {"input_ids": [b.input_ids for b in blocks], "labels": [b.labels for b in blocks],
                "position_ids": [b.position_ids for b in blocks]}
    return {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}


_CACHE: dict[tuple[Any, str], Any] = {}


def _cached(fn, key: str):
    if (fn, key) not in _CACHE:
        _CACHE[(fn, key)] = fn(key)
    return _CACHE[(fn, key)]


def _split(batch: pa.Table, fraction: float, seed: int, validation: bool) -> pa.Table:
    keep = [is_validation(json.dumps(r, sort_keys=True, default=str), fraction, seed) == validation
            for r in batch.to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def prepare_datasets(cfg: FinetuneJobConfig, base: str, records):
    """(train, validation) datasets of tokenized examples, materialised, the train order fixed by the seed."""
    d, seed = cfg.data, cfg.train.seed
    if d.validation:
        train, val = records, read_records(d.validation)
    else:
        split = {"fraction": d.validation_fraction, "seed": seed}
        train = records.map_batches(_split, batch_format="pyarrow", fn_kwargs={**split, "validation": False})
        val = records.map_batches(_split, batch_format="pyarrow", fn_kwargs={**split, "validation": True})
    tk = {"base": base, "max_len": d.max_length, "template": d.template}
    train = train.map_batches(_tokenize, batch_format="pyarrow", batch_size=256,
                              fn_kwargs={**tk, "packing": d.packing})
    val = val.map_batches(_tokenize, batch_format="pyarrow", batch_size=256, fn_kwargs={**tk, "packing": False})
    return train.random_shuffle(seed=seed).materialize(), val.materialize()


# --- 4. the training loop (every worker) ---------------------------------------------------------------------------
#
# train_loop reads as its phases: setup (setup_worker, setup_model, setup_optimizer) -> resume -> train (per step:
# forward_backward over the micro batches, optimizer_step, evaluate, log_step, save_checkpoint) -> save_outputs.

def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return f


def apply_lora(model: Any, cfg: FinetuneJobConfig) -> Any:
    """Wrap ``model`` with LoRA adapters; unknown targets and unexpected trainable counts are errors."""
    from peft import LoraConfig, get_peft_model

    names = linear_module_names(model)
    missing = [m for m in cfg.lora.target_modules if m not in names]
    if missing:
        raise RagtuneError(f"lora.target_modules: {missing} are not Linear layers of {cfg.model.name}. Fix: choose "
                           f"from {', '.join(names)}")
    expected = lora_param_count(model, cfg.lora.target_modules, cfg.lora.r)
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                  lora_dropout=cfg.lora.dropout,
                                                  target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    got = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if got != expected:
        raise RagtuneError(f"LoRA made {got:,} parameters trainable, but r={cfg.lora.r} on "
                           f"{cfg.lora.target_modules} implies {expected:,}: the model has layers peft treats "
                           "differently. Fix: choose other lora.target_modules")
    return peft_model


@dataclass
class TrainState:
    """What one worker's phases share: the model and its optimizer, and where training stands."""

    cfg: FinetuneJobConfig
    rank: int
    world: int
    device: Any  # torch.device
    tok: Any
    model: Any  # the (LoRA-wrapped) model; with plain torch, as Ray Train's prepare_model wrapped it
    engine: Any  # the DeepSpeed engine around ``model``; None with plain torch
    optimizer: Any
    scheduler: Any
    zero3_config: Any  # transformers' HfDeepSpeedConfig under ZeRO-3, else None; it keeps only a weak reference
    #                    to it, so it lives here as long as the model
    step: int = 0  # optimizer steps done
    baseline_rss_mib: float = 0.0  # this worker's resident memory before the model was built (memory plan's baseline)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per step done

    @property
    def net(self) -> Any:
        """What forward and backward go through: the DeepSpeed engine, or the model."""
        return self.engine if self.engine is not None else self.model


def setup_worker(cfg: FinetuneJobConfig) -> tuple[int, int, Any]:
    """This worker's (rank, world size, device); logging, progress bars and torch threads set for a worker."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    ensure_logging()
    # the libraries the model's setup imports, imported now: the baseline measured after this function (a
    # worker's memory before its model, what the memory plan's "above the baseline" leaves out) includes them
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per eval pass is noise
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many torch threads as the CPUs the worker reserved (a fraction: one)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        return_freed_memory()
    return ctx.get_world_rank(), ctx.get_world_size(), device


MMAP_THRESHOLD = 1 << 20  # bytes: allocations above it are mmapped by glibc, and unmapped when freed


def return_freed_memory() -> bool:
    """Make glibc give freed tensors back to the OS on a CPU worker (True where it could be set).

    glibc's malloc raises its mmap threshold to the size of any mmapped block freed (up to 32 MiB), after which
    tensors of up to that size come from the heap, and freed heap memory mostly stays resident: a CPU worker
    measured ~2x the bytes it had live at its peak, growing step by step (bench/finetune.py). A fixed threshold
    (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adjustment off) keeps resident memory at what the tensors
    hold, which is what the memory plan predicts; torch's own CPU allocator has no cache to return.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False


def setup_model(cfg: FinetuneJobConfig, base: str, precision: str, backend: str,
                ds_config: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    """(model, tokenizer, ZeRO-3 config): the base model in ``precision``, with LoRA for ``train.method = lora``.

    Under ZeRO-3 transformers loads the weights straight into each rank's partition (zero.Init, switched on by
    the returned HfDeepSpeedConfig, None otherwise), so no worker ever holds the whole model. The seed is set
    right before get_peft_model, so every rank starts alike. With ``train.activation_checkpointing`` (resolved
    to true by the driver) every decoder layer keeps only its input and is recomputed in the backward,
    non-reentrant (torch.utils.checkpoint's recommended mode: it works with ZeRO-3's parameter hooks and with
    inputs that do not require gradients).
    """
    import torch

    zero3_config = None
    if ds_config and ds_config["zero_optimization"].get("stage", 0) == 3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=backend)  # reuses Ray Train's process group
        zero3_config = HfDeepSpeedConfig(ds_config)
    tok = load_tokenizer(base)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = load_model(base, dtype=dtype, quantization=cfg.model.quantization)
    model.config.use_cache = False  # training never reads the KV cache; it would hold every layer's keys and values
    checkpointing = cfg.train.activation_checkpointing is True
    if checkpointing and not model.supports_gradient_checkpointing:
        raise RagtuneError(f"train.activation_checkpointing = true but {type(model).__name__} does not support it. "
                           "Fix: set train.activation_checkpointing to false or auto")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.train.seed)
    if cfg.train.method == "lora":
        model = apply_lora(model, cfg)
        if checkpointing:  # the frozen embeddings' output requires grad, as PEFT + checkpointing expect
            model.enable_input_require_grads()
    return model, tok, zero3_config


def setup_optimizer(cfg: FinetuneJobConfig, model: Any, ds_config: dict[str, Any] | None,
                    on_gpu: bool) -> tuple[Any, Any, Any, Any]:
    """(model, engine, optimizer, scheduler): AdamW on the trainable parameters with the configured schedule.

    With DeepSpeed, ``deepspeed.initialize`` builds the engine (DeepSpeed's fused AdamW on GPUs; on CPU a client
    ``torch.optim.AdamW``, which needs no op compile); without it, plain torch and Ray Train's ``prepare_model``
    (DDP), and the engine is None.
    """
    import ray.train.torch
    import torch

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(t.schedule, t.warmup_steps, t.steps)
    if ds_config:
        import deepspeed

        client_opt = None if on_gpu else torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=client_opt, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False)
        return model, engine, optimizer, scheduler
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return model, None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def setup(cfg: FinetuneJobConfig, base: str, precision: str, backend: str,
          ds_config: dict[str, Any] | None) -> TrainState:
    """The worker, its model and its optimizer, at step 0."""
    rank, world, device = setup_worker(cfg)
    baseline = psutil.Process().memory_info().rss / 2**20  # Python, torch, DeepSpeed, Ray: before the model
    model, tok, zero3_config = setup_model(cfg, base, precision, backend, ds_config)
    model, engine, optimizer, scheduler = setup_optimizer(cfg, model, ds_config, on_gpu=device.type != "cpu")
    return TrainState(cfg=cfg, rank=rank, world=world, device=device, tok=tok, model=model, engine=engine,
                      optimizer=optimizer, scheduler=scheduler, zero3_config=zero3_config, baseline_rss_mib=baseline)


def resume(s: TrainState) -> None:
    """Load the latest checkpoint, if there is one: weights, optimizer, scheduler, RNG, step and metrics."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return
    with ckpt.as_directory() as tmp:
        d = Path(tmp)
        if s.engine is not None:
            s.engine.load_checkpoint(str(d), tag="state")
        else:
            state = torch.load(d / "state.pt", weights_only=False)
            s.model.load_state_dict(state["model"])
            s.optimizer.load_state_dict(state["optimizer"])
            s.scheduler.load_state_dict(state["scheduler"])
        rng = d / f"rng-rank{s.rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=False))
        trainer_state = json.loads((d / "trainer_state.json").read_text())
    s.step, s.metrics = trainer_state["step"], trainer_state["metrics"]
    log.info("rank %d resumed at step %d", s.rank, s.step)


def _collate(batch: dict[str, Any], pad_id: int, device: Any, flatten: bool = False) -> dict[str, Any]:
    """A micro batch as the model's inputs. Examples: right-padded, with an attention mask. Packed blocks
    (``position_ids`` present): position ids and no attention mask, from which transformers masks every example
    to itself; ``flatten`` puts the blocks in one row without padding (flash-attention's variable-length form)."""
    import torch

    if "position_ids" in batch:
        blocks = [Block(list(i), list(lab), list(p)) for i, lab, p in zip(batch["input_ids"], batch["labels"],
                                                                          batch["position_ids"], strict=True)]
        cols = flatten_blocks(blocks) if flatten else pad_blocks(blocks, pad_id)
    else:
        cols = pad_batch([Example(list(i), list(lab)) for i, lab in zip(batch["input_ids"], batch["labels"],
                                                                        strict=True)], pad_id)
    out: dict[str, Any] = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in cols.items()}
    if "position_ids" in out:  # transformers masks packed sequences only without a KV cache (masking_utils)
        out["use_cache"] = False
    return out


def n_tokens(batch: dict[str, Any]) -> int:
    """The tokens of the examples in a collated micro batch, padding left out. A packed row's padding is its last
    sequence (positions restart there) when that sequence has no label: every example has one (``_tokenize``)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    n = 0
    for pos, labels in zip(batch["position_ids"].tolist(), batch["labels"].tolist(), strict=True):
        last = max(i for i, p in enumerate(pos) if p == 0)
        n += last if all(x == IGNORE for x in labels[last:]) else len(pos)
    return n


def _flattens(model: Any) -> bool:
    """Whether packed blocks go to ``model`` as one row: flash-attention finds the sequences in the position ids
    only in a batch of one row (transformers' ``_is_packed_sequence``); sdpa and eager mask each row."""
    inner = getattr(model, "module", model)  # under DDP
    return "flash" in str(getattr(getattr(inner, "config", None), "_attn_implementation", None) or "")


def micro_batches(s: TrainState, shard: Any, skip: int) -> Iterator[dict[str, Any]]:
    """This worker's micro batches on its device, epoch after epoch, without end.

    The first ``skip`` (trained on before a resume) are streamed again and dropped without compute, so a resumed
    run sees the same batches as an uninterrupted one.
    """
    seen, flatten = 0, _flattens(s.model)
    while True:
        for b in shard.iter_batches(batch_size=s.cfg.train.micro_batch, batch_format="numpy"):
            seen += 1
            if seen > skip:
                yield _collate(b, s.tok.pad_token_id, s.device, flatten)


def forward_backward(s: TrainState, batch: dict[str, Any]) -> float:
    """One micro batch's loss and gradients; DeepSpeed's engine also steps at its accumulation boundary."""
    out = s.net(**batch).loss
    loss = float(out.detach())  # the value only (float() of a tensor that needs grad warns)
    if s.engine is not None:
        s.engine.backward(out)
        s.engine.step()
    else:
        (out / s.cfg.train.accumulation).backward()
    return loss


def optimizer_step(s: TrainState, micro_losses: list[float], tokens: int, lr: float, t_start: float) -> dict[str, Any]:
    """Finish the optimizer step (plain torch: clip, step, schedule; DeepSpeed has stepped already) and return
    its metrics row: the mean loss and the tokens/s of the global batch, summed over every worker, and the largest
    resident memory of any worker, its peak so far and now (MiB). ``t_start``: when the step's first micro batch
    started (``time.perf_counter()``)."""
    import torch
    import torch.distributed as dist

    t = s.cfg.train
    if s.engine is None:
        torch.nn.utils.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], t.max_grad_norm)
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad()
    s.step += 1
    agg = torch.tensor([sum(micro_losses) / len(micro_losses), float(tokens)], dtype=torch.float64, device=s.device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss = torch.tensor([peak, psutil.Process().memory_info().rss / 2**20, s.baseline_rss_mib,
                        peak - s.baseline_rss_mib], dtype=torch.float64, device=s.device)
    if dist.is_initialized():
        dist.all_reduce(agg)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    dt = time.perf_counter() - t_start
    return {"step": s.step, "loss": float(agg[0]) / s.world, "lr": lr, "tokens_per_s": float(agg[1]) / dt,
            "max_rss_mib": float(rss[0]), "rss_mib": float(rss[1]), "baseline_rss_mib": float(rss[2]),
            "peak_above_baseline_mib": float(rss[3]), "time": time.time()}


def evaluate(s: TrainState, val_shard: Any) -> float:
    """The mean loss per answer token over the validation set (every worker reads all of it)."""
    import torch

    s.net.eval()
    loss_sum, n_tok = 0.0, 0
    with torch.no_grad():
        for b in val_shard.iter_batches(batch_size=s.cfg.train.micro_batch, batch_format="numpy"):
            batch = _collate(b, s.tok.pad_token_id, s.device, _flattens(s.model))
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(s.net(**batch).loss) * n
            n_tok += n
    s.net.train()
    return loss_sum / max(n_tok, 1)


def log_step(s: TrainState, row: dict[str, Any], stop_at: int, t_run: float, step_run: int,
             board: Any = None) -> None:
    """Rank 0 reports every step to the driver's display (``board``: ``jobs.console.board``), and logs the first
    steps, every eval step and ~50 lines a run in between, with an ETA from the rate of this attempt (started at
    ``t_run``, at step ``step_run``)."""
    t = s.cfg.train
    if s.rank == 0:
        console.report(board, "train", s.step, stop_at, "steps", time.perf_counter() - t_run,
                       f"loss {row['loss']:.4f}" + (f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                       + f", {row['tokens_per_s']:,.0f} tokens/s", start_done=step_run)
    log_every = max(1, t.steps // 50)
    if s.rank != 0 or not (s.step <= 3 or s.step % log_every == 0 or "eval_loss" in row or s.step == stop_at):
        return
    eta = (time.perf_counter() - t_run) / (s.step - step_run) * (stop_at - s.step)
    log.info("step %d/%d loss %.4f%s lr %.2e %.0f tokens/s, ETA %.0fs", s.step, t.steps, row["loss"],
             f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else "", row["lr"], row["tokens_per_s"], eta)


def save_checkpoint(s: TrainState, row: dict[str, Any]) -> None:
    """Report ``row`` with a checkpoint: every rank writes its DeepSpeed state (its ZeRO partition) or rank 0 the
    torch state, every rank its RNG state, rank 0 the step and the metrics so far."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if s.engine is not None:
            s.engine.save_checkpoint(str(d), tag="state")
        elif s.rank == 0:
            torch.save({"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                        "scheduler": s.scheduler.state_dict()}, d / "state.pt")
        torch.save(torch.get_rng_state(), d / f"rng-rank{s.rank}.pt")
        if s.rank == 0:
            (d / "trainer_state.json").write_text(json.dumps({"step": s.step, "metrics": s.metrics}))
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train(s: TrainState, train_shard: Any, val_shard: Any, stop_at: int,
          tracker: tracking.Tracker | None = None, board: Any = None) -> None:
    """Train from ``s.step`` to ``stop_at``: a metrics row per step (to ``tracker`` too, on rank 0), validation
    every ``train.eval_every`` steps, and a checkpoint (validated) every ``train.checkpoint_every`` steps and at
    ``stop_at``."""
    t = s.cfg.train
    if s.step >= stop_at:
        log.info("run %s is already at step %d of %d: nothing to train", s.cfg.run.name, s.step, stop_at)
        return
    micro_losses: list[float] = []
    tokens, t_step, lr = 0, time.perf_counter(), 0.0
    t_run, step_run = time.perf_counter(), s.step  # this attempt's start: the ETA's rate
    s.net.train()
    for batch in micro_batches(s, train_shard, skip=s.step * t.accumulation):
        if not micro_losses:
            lr = s.scheduler.get_last_lr()[0]  # the rate this step trains with
        tokens += n_tokens(batch)
        micro_losses.append(forward_backward(s, batch))
        if len(micro_losses) < t.accumulation:
            continue
        row = optimizer_step(s, micro_losses, tokens, lr, t_step)
        micro_losses, tokens, t_step = [], 0, time.perf_counter()
        checkpoint_now = s.step % t.checkpoint_every == 0 or s.step == stop_at
        if s.step % t.eval_every == 0 or checkpoint_now:
            row["eval_loss"] = evaluate(s, val_shard)
        s.metrics.append(row)
        log_step(s, row, stop_at, t_run, step_run, board)
        if tracker is not None:
            tracker.log(row)
        if checkpoint_now:
            save_checkpoint(s, row)
            if tracker is not None:
                tracker.sync()
        if s.step >= stop_at:
            return


def save_outputs(s: TrainState, outputs: str) -> None:
    """Rank 0 writes the adapter (LoRA) or the model (full), in the format plain transformers/peft load, and the
    metrics of every step; under ZeRO-3 every rank takes part in gathering the weights first."""
    inner = getattr(s.model, "module", s.model)
    method = s.cfg.train.method
    ctx: Any = contextlib.nullcontext()
    if s.zero3_config is not None:
        import deepspeed

        wanted = [p for p in inner.parameters() if p.requires_grad] if method == "lora" else list(inner.parameters())
        ctx = deepspeed.zero.GatheredParameters(wanted, modifier_rank=None)
    with ctx:
        if s.rank != 0:
            return
        out = resolve(outputs)
        with tempfile.TemporaryDirectory() as tmp:
            name = "adapter" if method == "lora" else "model"
            if method == "lora":  # the frozen base lm_head is not saved: under ZeRO-3 it is a partition
                inner.save_pretrained(Path(tmp) / name, save_embedding_layers=False)
            else:
                inner.save_pretrained(Path(tmp) / name)
            s.tok.save_pretrained(Path(tmp) / name)
            out.fs.create_dir(out.join(name).path, recursive=True)
            pafs.copy_files(str(Path(tmp) / name), out.join(name).path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=out.fs)
    body = "".join(json.dumps(m) + "\n" for m in s.metrics).encode()
    atomic_write_bytes(resolve(outputs).join("metrics.jsonl"), body)


@dataclass(frozen=True)
class WorkerConfig:
    """What ``fit`` hands every worker (Ray Train's ``train_loop_config`` is ``{"worker": WorkerConfig}``)."""

    cfg: FinetuneJobConfig
    base: str  # the base model every worker loads
    precision: str  # the plan's: fp32, bf16 or fp16
    backend: str  # the process group's backend: gloo or nccl
    deepspeed: dict[str, Any] | None  # DeepSpeed's own config dict (deepspeed_config); None without DeepSpeed
    outputs: str  # where rank 0 writes the adapter (or model) and the metrics
    board: Any = None  # rank 0 reports its steps to it: the driver's progress display (jobs.console.board)


def train_loop(config: dict[str, WorkerConfig]) -> None:
    """Every worker: setup, resume from the latest checkpoint, train, and save the outputs once finished."""
    import ray.train

    w = config["worker"]
    cfg = w.cfg
    s = setup(cfg, w.base, w.precision, w.backend, w.deepspeed)
    resume(s)
    stop_at = min(cfg.train.steps, cfg.train.stop_after_steps or cfg.train.steps)
    # rank 0 tracks every step as it ends (jobs/tracking.py says why there, not in a driver callback)
    tracker = (tracking.Tracker.open(cfg, resolve(w.outputs), resolve(cfg.run.storage_path).portable, s.step)
               if s.rank == 0 else None)
    try:
        train(s, ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation"), stop_at, tracker,
              w.board)
    except BaseException:
        if tracker is not None:
            with contextlib.suppress(Exception):  # the tracker may be what failed: keep the first error
                tracker.close("failed")
        raise
    finished = s.step >= cfg.train.steps  # not stopped early by train.stop_after_steps
    if finished:
        save_outputs(s, w.outputs)
    if tracker is not None:
        tracker.close("finished" if finished else "stopped")


# --- the job -----------------------------------------------------------------------------------------------------

@dataclass
class FinetuneSummary:
    run: str
    outputs: str
    steps: int
    loss_first: float | None
    loss_last: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    seconds: float
    finished: bool

    def line(self) -> str:
        def f(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"
        return (f"run {self.run}: {self.steps} steps, loss {f(self.loss_first)} -> {f(self.loss_last)}, eval loss "
                f"{f(self.eval_loss)}, {self.tokens_per_s or 0:,.0f} tokens/s, {self.seconds:.0f}s"
                + (f"; adapter at {self.outputs}" if self.finished else " (stopped early: rerun to continue)"))


def run(cfg: FinetuneJobConfig, callbacks: Sequence[UserCallback] = ()) -> FinetuneSummary:
    """Fine-tune as ``cfg`` says: check, plan the workers, prepare the data, train on Ray Train, save the outputs.

    Args:
        cfg: The job config.
        callbacks: Ray Train callbacks (``ray.train.UserCallback``) for this run, handed to
            ``ray.train.RunConfig(callbacks=...)``: the controller calls them after every report (metrics and
            checkpoint) and on a worker's exception, e.g. to follow the run from another system.

    Returns:
        The summary, also written to ``<storage_path>/<run.name>/outputs/summary.json``.
    """
    t0 = time.perf_counter()
    cfg, plan, _ = preflight(cfg)  # refuses a job whose memory plan does not fit, before any data or model work
    outputs = resolve(cfg.run.storage_path).join(cfg.run.name, "outputs")

    records = read_records(cfg.data.train)
    base = resolve_base_model(cfg, records)
    train_ds, val_ds = prepare_datasets(cfg, base, records)
    n_train, n_val = train_ds.count(), val_ds.count()
    if n_train < cfg.scaling.num_workers * cfg.train.micro_batch:
        raise RagtuneError(f"data.train has {n_train} examples after the validation split, fewer than one micro "
                           f"batch per worker ({cfg.scaling.num_workers} x {cfg.train.micro_batch}). Fix: more data, "
                           "or a smaller train.micro_batch / scaling.num_workers")
    log.info("base model %s; %d train / %d validation examples", base, n_train, n_val)

    result = fit(cfg, plan, base, train_ds, val_ds, outputs, callbacks)
    return finish(cfg, base, result, outputs, t0)


def command(cfg: FinetuneJobConfig) -> FinetuneSummary | None:
    """``ragtune finetune``: ``run`` it, or with ``--plan`` (``run.plan_only``) print the memory plan and exit."""
    if cfg.run.plan_only:
        preflight(cfg, say=console.out)
        return None
    return run(cfg)


def fit(cfg: FinetuneJobConfig, plan: TrainPlan, base: str, train_ds: Any, val_ds: Any, outputs: Location,
        callbacks: Sequence[UserCallback]) -> Result:
    """Run ``train_loop`` on the planned workers with Ray Train; a worker group that fails is restarted from the
    latest checkpoint, up to ``train.max_failures`` times. Raises the run's error."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with console.board() as board:  # rank 0's steps: the driver's progress display
        worker = WorkerConfig(
            cfg=cfg, base=base, precision=plan.precision, backend=plan.backend,
            deepspeed=deepspeed_config(cfg, plan.num_workers, plan.precision, plan.use_gpu, hidden_size(base))
            if cfg.deepspeed.enabled else None,
            outputs=outputs.portable, board=board)
        # MLFLOW_*/WANDB_*: the trackers' credentials and modes, for rank 0 (a local Ray's workers may predate
        # them)
        env = {k: v for k, v in os.environ.items()
               if k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE") or k.startswith(("MLFLOW_", "WANDB_"))}
        # the workers stream them every epoch and eval pass: a progress bar each is noise
        for ds in (train_ds, val_ds):
            ds.context.enable_progress_bars = False
            ds.context.print_on_execution_start = False
        # mypy sees ray.air's RunConfig, which `ray.train` replaces at import with Ray Train V2's (the default):
        # that one takes worker_runtime_env and UserCallbacks
        run_config = ray.train.RunConfig(  # type: ignore[call-arg]
            name=cfg.run.name, storage_path=resolve(cfg.run.storage_path).portable,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_best,
                                                         checkpoint_score_attribute="eval_loss",
                                                         checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=list(callbacks))  # type: ignore[arg-type]
        trainer = TorchTrainer(
            train_loop, train_loop_config={"worker": worker},
            scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                                   resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=run_config,
            datasets={"train": train_ds, "validation": val_ds},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        try:
            result = trainer.fit()
        except SystemExit as e:
            # Ray Train's own Ctrl-C handler (set inside fit) aborts the run, then calls sys.exit from the signal
            # handler: the job is interrupted (130 and the message, as elsewhere), not a silent exit status 1;
            # what the run saved (its checkpoints) is kept, and a rerun resumes from the last one
            raise Stopped(signal.SIGINT) from e
        if result.error:
            raise result.error
        return result


def finish(cfg: FinetuneJobConfig, base: str, result: Result, outputs: Location, t0: float) -> FinetuneSummary:
    """The driver's outputs beside the workers' (adapter, metrics): the resolved config, the loss curve, the merged
    model (``run.merge``, once finished) and the summary, from the run's latest checkpoint."""
    finished = False
    metrics: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "trainer_state.json").read_text())
        metrics = state["metrics"]
        finished = state["step"] >= cfg.train.steps
    atomic_write_bytes(outputs.join("config.json"), json.dumps(cfg.model_dump(mode="json"), indent=2).encode())
    if metrics:
        _plot(metrics, outputs, cfg.run.name)
    if finished and cfg.run.merge and cfg.train.method == "lora":
        merge_adapter(base, outputs.join("adapter").portable, outputs.join("merged").portable)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    tps = [m["tokens_per_s"] for m in metrics[1:]] or [m["tokens_per_s"] for m in metrics]
    summary = FinetuneSummary(
        run=cfg.run.name, outputs=outputs.portable, steps=metrics[-1]["step"] if metrics else 0,
        loss_first=metrics[0]["loss"] if metrics else None, loss_last=metrics[-1]["loss"] if metrics else None,
        eval_loss=evals[-1] if evals else None, tokens_per_s=sorted(tps)[len(tps) // 2] if tps else None,
        seconds=time.perf_counter() - t0, finished=finished)
    atomic_write_bytes(outputs.join("summary.json"), json.dumps(asdict(summary), indent=2).encode())
    return summary


def _plot(metrics: list[dict[str, Any]], outputs: Location, name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="train loss")
    ev = [m for m in metrics if "eval_loss" in m]
    ax.plot([m["step"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(f"ragtune finetune: {name}")
    ax.legend()
    fig.tight_layout()
    atomic_write_bytes(outputs.join("loss.png"), png(fig, dpi=100))


def merge_adapter(base: str, adapter: str, dest: str) -> None:
    """Save base + adapter merged into one model (on the driver, with plain transformers + peft)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_model(base), local_model_dir(adapter)).merge_and_unload()
    out = resolve(dest)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)
        out.fs.create_dir(out.path, recursive=True)
        pafs.copy_files(tmp, out.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out.fs)


if __name__ == "__main__":  # python -m jobs.finetune --config FILE [overrides] (what `ray job submit` calls)
    job_main("finetune", command)
