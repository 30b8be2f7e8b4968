"""The fine-tuning job's memory plan before launch (from config.json alone), its check against the cluster, and
activation checkpointing in the worker's model."""

import pytest
import torch
from transformers import LlamaConfig

from cluster.placement import NodeResources, plan_training
from configs.errors import RagtuneError
from configs.schema import FinetuneJobConfig, load_config
from jobs.finetune import check_memory, memory_plan, setup_model
from tests.conftest import REPO

TINY = REPO / "configs" / "finetune" / "tiny.yaml"
GiB = 2**30
CPU_NODE = NodeResources(cpus=2, memory=16 * GiB)


def cfg(*overrides):
    return load_config(FinetuneJobConfig, TINY, overrides)


@pytest.fixture(scope="module")
def llama8b_dir(tmp_path_factory):
    """A folder with Llama-3-8B's config.json and nothing else: the plan needs no weights."""
    d = tmp_path_factory.mktemp("llama3-8b")
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False).save_pretrained(d)
    return str(d)


def test_the_tiny_demo_plans_without_checkpointing(tmp_path):
    c = cfg(f"run.storage_path={tmp_path}")
    mem = memory_plan(c, plan_training([CPU_NODE], 2, "auto"))
    s = mem.settings
    assert (s.device, s.precision, s.stage, s.workers, s.checkpointing) == ("cpu", "fp32", 2, 2, False)
    h, f, v = 128, 512, 1024  # model.tiny: 2 layers x 128, untied, vocab 1024
    assert mem.facts.params == 2 * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h
    # activations are its largest term, but ~20 MiB: far below the 1 GiB where auto turns checkpointing on
    assert mem.dominant == "activations" and mem.activations < 32 * 2**20
    assert "memory plan: tiny" in mem.table()


def test_auto_checkpointing_is_on_where_activations_dominate(llama8b_dir):
    plan = plan_training([NodeResources(cpus=32, gpus=8)], 8, "auto")
    long = memory_plan(cfg(f"model.name={llama8b_dir}", "data.max_length=4096", "train.micro_batch=4"), plan)
    assert long.settings.checkpointing and long.settings.precision == "bf16"
    off = memory_plan(cfg(f"model.name={llama8b_dir}", "data.max_length=4096", "train.micro_batch=4",
                          "train.activation_checkpointing=false"), plan)
    assert not off.settings.checkpointing and off.dominant == "activations" and off.activations > long.activations
    short = memory_plan(cfg(f"model.name={llama8b_dir}", "data.max_length=128", "train.micro_batch=1"), plan)
    assert not short.settings.checkpointing and short.dominant == "weights"


def test_a_job_that_does_not_fit_the_gpus_is_refused_with_fixes_that_fit(llama8b_dir):
    plan = plan_training([NodeResources(cpus=32, gpus=8)], 8, "auto")
    c = cfg(f"model.name={llama8b_dir}", "train.method=full", "deepspeed.preset=zero2", "data.max_length=4096",
            "train.micro_batch=1", "train.activation_checkpointing=false", "scaling.num_workers=8",
            "scaling.gpu_memory_gib=40")
    mem = memory_plan(c, plan)
    with pytest.raises(RagtuneError) as e:
        check_memory(c, plan, mem, [NodeResources(cpus=32, gpus=8)])
    text = str(e.value)
    assert f"predicts {mem.total / GiB:.2f} GiB per GPU" in text
    assert "scaling.gpu_memory_gib = 40 gives 40.00 GiB" in text
    assert "Fix: " in text and "deepspeed.stage=3" in text
    # the first fix named, applied, fits
    fix = text.split("Fix: ", 1)[1].split(" (", 1)[0]
    fixed = cfg(*[f"model.name={llama8b_dir}", "train.method=full", "deepspeed.preset=zero2",
                  "data.max_length=4096", "train.micro_batch=1", "train.activation_checkpointing=false",
                  "scaling.num_workers=8", "scaling.gpu_memory_gib=40"], *fix.split())
    assert "fits" in check_memory(fixed, plan, memory_plan(fixed, plan), [NodeResources(cpus=32, gpus=8)])


def test_on_cpus_the_plan_is_checked_against_the_nodes_memory_shared_by_its_workers(tmp_path):
    c = cfg(f"run.storage_path={tmp_path}", "model.tiny.layers=8", "model.tiny.hidden=768", "model.tiny.heads=12",
            "model.tiny.vocab=2048", "data.max_length=512", "train.activation_checkpointing=false")
    plan = plan_training([CPU_NODE], 2, "auto")
    mem = memory_plan(c, plan)
    assert "fits" in check_memory(c, plan, mem, [CPU_NODE])
    small = NodeResources(cpus=2, memory=2 * mem.total - 2**20)  # just too little for two workers
    with pytest.raises(RagtuneError, match=r"shared by 2 worker\(s\) gives .*train.activation_checkpointing=true"):
        check_memory(c, plan, mem, [small])


def test_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir):
    """Non-reentrant activation checkpointing with LoRA: the same loss and adapter gradients as without."""
    results, batch = [], None
    for on in (False, True):
        c = cfg(f"train.activation_checkpointing={str(on).lower()}")
        model, _, _ = setup_model(c, tiny_model_dir, "fp32", "gloo", None)
        if batch is None:
            ids = torch.randint(5, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
            mask = torch.ones(2, 24, dtype=torch.long)
            mask[1, -6:] = 0
            batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        assert model.is_activation_checkpointing == on and not model.config.use_cache
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert grads_off.keys() == grads_on.keys() and len(grads_on) > 0
    for n in grads_off:
        torch.testing.assert_close(grads_on[n], grads_off[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.integration
def test_finetune_plan_prints_the_plan_and_trains_nothing(ray_2_cpus, tmp_path, capsys):
    from jobs.cli import main

    assert main(["finetune", "--plan", "-c", str(TINY), f"run.storage_path={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: tiny" in out and "activation checkpointing off" in out and "fits" in out
    made = [p for p in tmp_path.rglob("*") if p.is_file() and "_logs" not in p.parts]
    assert made == []  # no base model built, no checkpoint, no outputs (the run's log aside)


def test_cpu_workers_give_freed_tensors_back_to_the_os():
    """After a freed 24 MiB tensor, glibc serves the next ones from its heap and keeps them resident when freed;
    with return_freed_memory (what setup_worker does on CPU workers) resident memory falls back after a free."""
    import subprocess
    import sys

    probe = """
import sys, psutil, torch
from jobs.finetune import return_freed_memory
if sys.argv[1] == "set":
    assert return_freed_memory()
def rss():
    return psutil.Process().memory_info().rss / 2**20
t = torch.ones(6 << 20)  # 24 MiB, mmapped and freed: glibc raises its threshold above it
del t
before = rss()
x = [torch.ones(5 << 20) for _ in range(4)]  # 4 x 20 MiB
del x
print(rss() - before)
"""
    kept = {}
    for mode in ("default", "set"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, cwd=REPO,
                             check=True)
        kept[mode] = float(out.stdout.strip().splitlines()[-1])
    assert kept["default"] > 15 and kept["set"] < 5, kept


@pytest.mark.integration
@pytest.mark.slow
def test_a_zero3_run_with_checkpointing_trains_and_records_it(ray_2_cpus, tmp_path):
    """A short real run, ZeRO-3 (where checkpointing's recompute gathers each layer's weights again) with LoRA:
    the loss falls, the resolved setting is in config.json, and every step row has the workers' baseline."""
    import json

    from jobs.finetune import run

    data = REPO / "configs" / "finetune" / "data" / "capitals.jsonl"
    c = cfg(f"data.train={data}", "train.steps=12", "train.eval_every=12", "train.checkpoint_every=12",
            "deepspeed.preset=zero3", "train.activation_checkpointing=true", f"run.storage_path={tmp_path}",
            "run.name=z3-ckpt")
    summary = run(c)
    assert summary.finished and summary.loss_last < summary.loss_first
    out = tmp_path / "z3-ckpt" / "outputs"
    assert json.loads((out / "config.json").read_text())["train"]["activation_checkpointing"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["baseline_rss_mib"] > 100 and 0 < r["peak_above_baseline_mib"] < r["max_rss_mib"] for r in rows)
