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
   with validation, metrics and a checkpoint every N steps (``ray.train.report``, best K by eval loss kept);
5. rank 0 saves the adapter (gathered first under ZeRO-3) and the metrics; the driver adds the resolved config,
   the loss curve, optionally the merged model, and prints a summary line.

Rerunning the same ``run.name`` continues from its latest checkpoint (a stopped run, or a finished one whose
``train.steps`` was raised); a worker that dies is restarted by Ray Train from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cluster.placement import plan_training
from configs import CONFIG_DIR
from configs.errors import RagtuneError
from configs.schema import FinetuneJobConfig
from jobs.commands import job_main

log = logging.getLogger("ragtune.finetune")

DEEPSPEED_PRESETS = CONFIG_DIR / "deepspeed"
# Keys the job config owns (STYLE 7: one source of truth); a preset that sets them is overwritten, with a warning.
JOB_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
             "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")
CRASH_ENV = "RAGTUNE_TEST_CRASH_AT_STEP"  # test hook: the last rank exits at this step, on the first attempt only


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
    from sharding.corpus import CorpusError, list_corpus

    if cfg.deepspeed.enabled:
        load_preset(cfg.deepspeed.preset)
    for field, paths in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        if paths is None:
            continue
        try:
            corpus = list_corpus(paths)
        except CorpusError as e:
            raise RagtuneError(str(e).replace("corpus.path", field)) from None
        bad = [f.uri for f in corpus.files if f.kind == "text"]
        if bad:
            raise RagtuneError(f"{field}: {bad[0]} is a text file; training data is JSONL or Parquet records "
                               "with `messages` or `prompt`/`completion`")
        for f in corpus.of_kind("jsonl"):
            first = _first_record(corpus.fs, f.path)
            if first is not None and "messages" not in first and not {"prompt", "completion"} <= set(first):
                raise RagtuneError(f"{field}: {f.uri}: the first record has neither `messages` nor `prompt` and "
                                   f"`completion` (fields: {', '.join(first)}). Fix: convert the data")


def _first_record(fs: Any, path: str) -> dict[str, Any] | None:
    with fs.open_input_stream(path) as s:
        for line in s.read(1 << 20).decode("utf-8", "replace").splitlines():
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    raise RagtuneError(f"{path}: the first line is not JSON. Fix: one JSON object per line") from None
    return None


# --- 2/3. base model and data (driver) -----------------------------------------------------------------------------

def read_records(paths: str | list[str]):
    """A Ray Dataset of the records in JSONL/Parquet files."""
    import ray.data

    from sharding.corpus import list_corpus

    corpus = list_corpus(paths)
    parts = []
    if jsonl := corpus.of_kind("jsonl"):
        parts.append(ray.data.read_json([f.path for f in jsonl], filesystem=corpus.fs, file_extensions=None))
    if parquet := corpus.of_kind("parquet"):
        parts.append(ray.data.read_parquet([f.path for f in parquet], filesystem=corpus.fs, file_extensions=None))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _record_text(r: dict[str, Any]) -> str:
    from models.sft import to_messages

    return "\n".join(m["content"] for m in to_messages(r))


def resolve_base_model(cfg: FinetuneJobConfig, records) -> str:
    """The base model every worker loads: the configured one, or the tiny preset built into the run folder.
    A local folder is made absolute: Ray's workers do not run in this process's working directory."""
    if cfg.model.name != "tiny":
        from models.generators import absolute_model_name

        return absolute_model_name(cfg.model.name)
    import tempfile

    import pyarrow.fs as pafs

    from models.generators import TinySpec, build_tiny
    from sharding.storage import exists, resolve

    dest = resolve(cfg.run.storage_path).join(cfg.run.name, "base_model")
    if exists(dest.join("config.json")):  # a rerun of the run keeps its base model (and tokenizer)
        return dest.portable
    t = cfg.model.tiny
    spec = TinySpec(layers=t.layers, hidden=t.hidden, heads=t.heads, intermediate=4 * t.hidden, vocab=t.vocab,
                    seed=cfg.train.seed)
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

    from models.generators import local_model_dir

    config = AutoConfig.from_pretrained(local_model_dir(base))
    config = getattr(config, "text_config", None) or config
    return getattr(config, "hidden_size", None)


def _tokenize(batch: pa.Table, base: str, max_len: int, template: str, packing: bool) -> dict[str, Any]:
    from models.generators import load_tokenizer
    from models.sft import encode_record, pack

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
    if packing:
        examples = pack(examples, max_len)
    return {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}


_CACHE: dict[tuple[Any, str], Any] = {}


def _cached(fn, key: str):
    if (fn, key) not in _CACHE:
        _CACHE[(fn, key)] = fn(key)
    return _CACHE[(fn, key)]


def _split(batch: pa.Table, fraction: float, seed: int, validation: bool) -> pa.Table:
    from models.sft import is_validation

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

    from models.generators import linear_module_names, lora_param_count

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


def _collate(batch: dict[str, Any], pad_id: int, device: Any) -> dict[str, Any]:
    import torch

    from models.sft import Example, pad_batch

    padded = pad_batch([Example(list(i), list(lab)) for i, lab in zip(batch["input_ids"], batch["labels"],
                                                                      strict=True)], pad_id)
    return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in padded.items()}


def train_loop(config: dict[str, Any]) -> None:
    import tempfile

    import psutil
    import ray.data
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from jobs.progress import ensure_logging
    from models.generators import load_model, load_tokenizer

    cfg = FinetuneJobConfig.model_validate(config["cfg"])  # typed config first (STYLE 5)
    ensure_logging()
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per eval pass is noise
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type != "cpu"
    if not on_gpu:  # as many torch threads as the CPUs the worker reserved (a fraction: one)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    t = cfg.train

    # model: under ZeRO-3 transformers loads the weights straight into each rank's partition (zero.Init), so no
    # worker ever holds the whole model; seed right before get_peft_model, so every rank starts alike
    ds_config = config["deepspeed"]
    zero3 = bool(ds_config) and ds_config["zero_optimization"].get("stage", 0) == 3
    if zero3:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend=config["backend"])  # reuses Ray Train's process group
        hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (a weak reference to it is what transformers checks)
    tok = load_tokenizer(config["base"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"], torch.float32)
    model = load_model(config["base"], dtype=dtype)
    torch.manual_seed(t.seed)
    model = apply_lora(model, cfg) if t.method == "lora" else model
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = lr_lambda(t.schedule, t.warmup_steps, t.steps)

    if cfg.deepspeed.enabled:
        import deepspeed

        client_opt = None if on_gpu else torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=client_opt, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            dist_init_required=False)
    else:
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        engine = None

    # resume: weights, optimizer, scheduler, RNG, step and metrics from the latest checkpoint
    state: dict[str, Any] = {"step": 0, "metrics": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _load(Path(d), engine, model, optimizer, scheduler, rank)
            state = json.loads((Path(d) / "trainer_state.json").read_text())
        log.info("rank %d resumed at step %d", rank, state["step"])
    step = state["step"]
    metrics: list[dict[str, Any]] = state["metrics"]
    stop_at = min(t.steps, t.stop_after_steps or t.steps)
    if step >= stop_at:
        log.info("run %s is already at step %d of %d: nothing to train", cfg.run.name, step, stop_at)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    net = engine if engine is not None else model

    def evaluate() -> float:
        net.eval()
        loss_sum, n_tok = 0.0, 0
        with torch.no_grad():
            for b in val_shard.iter_batches(batch_size=t.micro_batch, batch_format="numpy"):
                batch = _collate(b, tok.pad_token_id, device)
                n = int((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(net(**batch).loss) * n
                n_tok += n
        net.train()
        return loss_sum / max(n_tok, 1)

    def save_and_report(row: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            _save(Path(tmp), engine, model, optimizer, scheduler, rank)
            if rank == 0:
                (Path(tmp) / "trainer_state.json").write_text(json.dumps({"step": step, "metrics": metrics}))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    consumed = step * t.accumulation  # micro batches this worker already trained on
    seen = 0
    micro_losses: list[float] = []
    tokens, t_step, lr = 0, time.perf_counter(), 0.0
    t_run, step_run = time.perf_counter(), step  # this attempt's start: the ETA's rate
    log_every = max(1, t.steps // 50)  # ~50 progress lines a run, plus the first steps and every eval
    net.train()
    while step < stop_at:
        for b in train_shard.iter_batches(batch_size=t.micro_batch, batch_format="numpy"):
            seen += 1
            if seen <= consumed:  # trained on before the resume: streamed again, skipped without compute
                continue
            batch = _collate(b, tok.pad_token_id, device)
            if not micro_losses:
                lr = scheduler.get_last_lr()[0]  # the rate this step trains with
            tokens += int(batch["attention_mask"].sum())
            loss = net(**batch).loss
            micro_losses.append(float(loss))
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / t.accumulation).backward()
            if len(micro_losses) < t.accumulation:
                continue
            if engine is None:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            # (mean loss, tokens) summed over every worker: the numbers of the global batch; and the largest
            # resident memory of any worker, its peak so far and now, after the step (MiB)
            agg = torch.tensor([sum(micro_losses) / len(micro_losses), float(tokens)], dtype=torch.float64,
                               device=device)
            rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                psutil.Process().memory_info().rss / 2**20], dtype=torch.float64, device=device)
            if dist.is_initialized():
                dist.all_reduce(agg)
                dist.all_reduce(rss, op=dist.ReduceOp.MAX)
            micro_losses, dt = [], time.perf_counter() - t_step
            row = {"step": step, "loss": float(agg[0]) / world, "lr": lr,
                   "tokens_per_s": float(agg[1]) / dt, "max_rss_mib": float(rss[0]), "rss_mib": float(rss[1]),
                   "time": time.time()}
            tokens, t_step = 0, time.perf_counter()
            if config.get("crash_at_step") == step and rank == world - 1:
                marker = Path(config["crash_marker"])
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(str(step))
                    log.warning("test hook %s: rank %d exits at step %d", CRASH_ENV, rank, step)
                    os._exit(1)
            checkpoint_now = step % t.checkpoint_every == 0 or step == stop_at
            if step % t.eval_every == 0 or checkpoint_now:
                row["eval_loss"] = evaluate()
            metrics.append(row)
            if rank == 0 and (step <= 3 or step % log_every == 0 or "eval_loss" in row or step == stop_at):
                eta = (time.perf_counter() - t_run) / (step - step_run) * (stop_at - step)
                log.info("step %d/%d loss %.4f%s lr %.2e %.0f tokens/s, ETA %.0fs", step, t.steps, row["loss"],
                         f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else "", row["lr"],
                         row["tokens_per_s"], eta)
            if checkpoint_now:
                save_and_report(row)
            if step >= stop_at:
                break

    # outputs: the adapter (or the full model) in the format plain transformers/peft load
    if step >= t.steps:
        _save_model(config["outputs"], model, tok, rank, zero3, t.method)
        if rank == 0:
            from sharding.storage import atomic_write_bytes, resolve

            body = "".join(json.dumps(m) + "\n" for m in metrics).encode()
            atomic_write_bytes(resolve(config["outputs"]).join("metrics.jsonl"), body)


def _save(d: Path, engine: Any, model: Any, optimizer: Any, scheduler: Any, rank: int) -> None:
    import torch

    if engine is not None:
        engine.save_checkpoint(str(d), tag="state")  # every rank writes its ZeRO partition
    elif rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, d / "state.pt")
    torch.save(torch.get_rng_state(), d / f"rng-rank{rank}.pt")


def _load(d: Path, engine: Any, model: Any, optimizer: Any, scheduler: Any, rank: int) -> None:
    import torch

    if engine is not None:
        engine.load_checkpoint(str(d), tag="state")
    else:
        s = torch.load(d / "state.pt", weights_only=False)
        model.load_state_dict(s["model"])
        optimizer.load_state_dict(s["optimizer"])
        scheduler.load_state_dict(s["scheduler"])
    rng = d / f"rng-rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=False))


def _save_model(outputs: str, model: Any, tok: Any, rank: int, zero3: bool, method: str) -> None:
    """Rank 0 writes the adapter (LoRA) or the model (full) to ``outputs``; ZeRO-3 gathers the weights first."""
    import contextlib
    import tempfile

    import pyarrow.fs as pafs

    from sharding.storage import resolve

    inner = getattr(model, "module", model)
    ctx: Any = contextlib.nullcontext()
    if zero3:
        import deepspeed

        wanted = [p for p in inner.parameters() if p.requires_grad] if method == "lora" else list(inner.parameters())
        ctx = deepspeed.zero.GatheredParameters(wanted, modifier_rank=None)
    with ctx:
        if rank != 0:
            return
        out = resolve(outputs)
        with tempfile.TemporaryDirectory() as tmp:
            name = "adapter" if method == "lora" else "model"
            if method == "lora":  # the frozen base lm_head is not saved: under ZeRO-3 it is a partition
                inner.save_pretrained(Path(tmp) / name, save_embedding_layers=False)
            else:
                inner.save_pretrained(Path(tmp) / name)
            tok.save_pretrained(Path(tmp) / name)
            out.fs.create_dir(out.join(name).path, recursive=True)
            pafs.copy_files(str(Path(tmp) / name), out.join(name).path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=out.fs)


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


def run(cfg: FinetuneJobConfig) -> FinetuneSummary:
    t0 = time.perf_counter()
    check(cfg)

    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.runtime import alive_nodes, init_ray
    from sharding.storage import atomic_write_bytes, resolve

    init_ray(cfg.cluster)
    plan = plan_training(alive_nodes(), cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker,
                         cfg.train.precision)
    log.info("%s", plan.reason)
    run_dir = resolve(cfg.run.storage_path).join(cfg.run.name)
    outputs = run_dir.join("outputs")

    records = read_records(cfg.data.train)
    base = resolve_base_model(cfg, records)
    train_ds, val_ds = prepare_datasets(cfg, base, records)
    n_train, n_val = train_ds.count(), val_ds.count()
    if n_train < cfg.scaling.num_workers * cfg.train.micro_batch:
        raise RagtuneError(f"data.train has {n_train} examples after the validation split, fewer than one micro "
                           f"batch per worker ({cfg.scaling.num_workers} x {cfg.train.micro_batch}). Fix: more data, "
                           "or a smaller train.micro_batch / scaling.num_workers")
    log.info("base model %s; %d train / %d validation examples", base, n_train, n_val)

    train_config: dict[str, Any] = {
        "cfg": cfg.model_dump(mode="json"), "base": base, "precision": plan.precision, "backend": plan.backend,
        "deepspeed": deepspeed_config(cfg, plan.num_workers, plan.precision, plan.use_gpu, hidden_size(base))
        if cfg.deepspeed.enabled else None,
        "outputs": outputs.portable,
    }
    if os.environ.get(CRASH_ENV):
        train_config["crash_at_step"] = int(os.environ[CRASH_ENV])
        train_config["crash_marker"] = str(Path(run_dir.path) / f".test-crash-{os.environ[CRASH_ENV]}")
    env = {k: v for k, v in os.environ.items() if k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE")}
    for ds in (train_ds, val_ds):  # the workers stream them every epoch and eval pass: a progress bar each is noise
        ds.context.enable_progress_bars = False
        ds.context.print_on_execution_start = False
    trainer = TorchTrainer(
        train_loop, train_loop_config=train_config,
        scaling_config=ray.train.ScalingConfig(num_workers=plan.num_workers, use_gpu=plan.use_gpu,
                                               resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=resolve(cfg.run.storage_path).portable,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_best,
                                                         checkpoint_score_attribute="eval_loss",
                                                         checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": env} if env else None),
        datasets={"train": train_ds, "validation": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error

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


def _plot(metrics: list[dict[str, Any]], outputs: Any, name: str) -> None:
    from jobs.plots import png, pyplot
    from sharding.storage import atomic_write_bytes

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
    import tempfile

    import pyarrow.fs as pafs
    from peft import PeftModel

    from models.generators import load_model, load_tokenizer, local_model_dir
    from sharding.storage import resolve

    merged = PeftModel.from_pretrained(load_model(base), local_model_dir(adapter)).merge_and_unload()
    out = resolve(dest)
    with tempfile.TemporaryDirectory() as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(base).save_pretrained(tmp)
        out.fs.create_dir(out.path, recursive=True)
        pafs.copy_files(tmp, out.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=out.fs)



if __name__ == "__main__":  # python -m jobs.finetune --config FILE [overrides] (what `ray job submit` calls)
    job_main("finetune", run)
