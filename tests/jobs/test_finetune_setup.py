"""The fine-tuning job's setup, without Ray: configs, DeepSpeed dicts, LoRA checks, worker plans."""

import pytest

from cluster.placement import NodeResources, plan_training
from configs.errors import RagtuneError
from configs.schema import ConfigError, FinetuneJobConfig, load_config
from jobs.finetune import apply_lora, check, deepspeed_config, lr_lambda
from tests.conftest import REPO

TINY = REPO / "configs" / "finetune" / "tiny.yaml"


def cfg(*overrides):
    return load_config(FinetuneJobConfig, TINY, overrides)


def test_config_problems_are_reported_with_the_fix():
    with pytest.raises(ConfigError) as e:
        cfg("train.global_batch=64")
    text = str(e.value)
    assert "train.global_batch = 64 but micro_batch x accumulation x workers = 8 x 1 x 2 = 16" in text
    assert "Fix: set train.accumulation to 4" in text
    with pytest.raises(ConfigError, match="deepspeed.offload = true needs DeepSpeed, but deepspeed.enabled = false"
                                          ". Fix: enable deepspeed"):
        cfg("deepspeed.enabled=false", "deepspeed.offload=true")
    with pytest.raises(ConfigError, match=r"stop_after_steps \(500\) is past train.steps \(40\)"):
        cfg("train.stop_after_steps=500")
    with pytest.raises(ConfigError, match="deepspeed.offload = true needs ZeRO stage 2 or 3, not 1"):
        cfg("deepspeed.offload=true", "deepspeed.stage=1")
    assert cfg("train.global_batch=16").train.global_batch == 16


def test_deepspeed_dict_takes_batch_and_precision_from_the_job_config(tmp_path):
    ds = deepspeed_config(cfg("train.micro_batch=3", "train.accumulation=5", "deepspeed.preset=zero3"), world=2,
                          precision="fp32", on_gpu=False, hidden_size=128)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (3, 5, 30)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and ds["bf16"] == {"enabled": False}
    # buckets left `auto` by the preset follow the hidden size, as transformers' integration sets them
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (128 * 128, int(0.9 * 128 * 128), 1280)
    with pytest.raises(RagtuneError,
                       match="zero_optimization.stage3_prefetch_bucket_size is auto but the model's hidden"):
        deepspeed_config(cfg("deepspeed.preset=zero3"), 2, "fp32", on_gpu=False)
    assert "optimizer" not in ds  # CPU: the job passes torch.optim.AdamW
    gpu = deepspeed_config(cfg("deepspeed.stage=2", "deepspeed.offload=true"), 4, "bf16", on_gpu=True,
                           hidden_size=64)
    assert gpu["bf16"] == {"enabled": True} and gpu["optimizer"]["type"] == "AdamW"
    assert gpu["zero_optimization"]["stage"] == 2 and gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    preset = tmp_path / "mine.json"
    preset.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 99, '
                      '"optimizer": {"type": "SGD"}}')
    ds = deepspeed_config(cfg(f"deepspeed.preset={preset}"), 2, "fp32", on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and "optimizer" not in ds  # the job config wins
    with pytest.raises(RagtuneError, match=r"deepspeed.preset = 'zero9': no such preset. Fix: use one of zero0, "
                                           r"zero2, zero3, zero3-offload"):
        deepspeed_config(cfg("deepspeed.preset=zero9"), 2, "fp32", on_gpu=False)
    with pytest.raises(RagtuneError, match="optimizer offload needs ZeRO stage 2 or 3"):
        deepspeed_config(cfg("deepspeed.preset=zero0", "deepspeed.offload=true"), 2, "fp32", on_gpu=False)


def test_unknown_lora_targets_list_the_models_layers(tiny_model_dir):
    from models.generators import load_model

    with pytest.raises(RagtuneError, match=r"lora.target_modules: \['query'\] are not Linear layers .* Fix: "
                                           r"choose from down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        apply_lora(load_model(tiny_model_dir), cfg("lora.target_modules=[q_proj, query]"))


def test_lora_trains_exactly_the_parameters_the_config_implies(tiny_model_dir):
    from models.generators import load_model

    model = apply_lora(load_model(tiny_model_dir), cfg("lora.r=4", "lora.target_modules=[q_proj, lm_head]"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    h, v = 128, model.config.vocab_size
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (2 * 2 * h + h + v)


def test_training_plans_fit_the_cluster_or_fail_before_work():
    laptop = [NodeResources(cpus=2)]
    p = plan_training(laptop, 2)
    assert (p.use_gpu, p.backend, p.precision) == (False, "gloo", "fp32")
    with pytest.raises(RagtuneError, match="2 x 2 CPUs but the cluster has 2"):
        plan_training(laptop, 2, cpus_per_worker=2)
    with pytest.raises(RagtuneError, match="2 GPU workers but the cluster has 0 GPUs. Fix: set scaling.use_gpu"):
        plan_training(laptop, 2, use_gpu=True)
    with pytest.raises(RagtuneError, match="train.precision = 'bf16' needs GPU workers"):
        plan_training(laptop, 1, precision="bf16")
    gpus = [NodeResources(cpus=32, gpus=4), NodeResources(cpus=32, gpus=4)]
    p = plan_training(gpus, 8)
    assert (p.use_gpu, p.backend, p.precision) == (True, "nccl", "bf16")
    assert plan_training(gpus, 8, use_gpu=False).backend == "gloo"
    with pytest.raises(RagtuneError, match="Fix: set scaling.num_workers <= 8"):
        plan_training(gpus, 9)


def test_schedule_warms_up_then_decays():
    f = lr_lambda("cosine", warmup=4, total=20)
    assert [round(f(s), 3) for s in (0, 3)] == [0.25, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.0, abs=1e-9) and 0 < f(12) < 1
    assert lr_lambda("constant", 0, 10)(9) == 1.0 and lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)


def test_bad_training_data_fails_before_work(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no answer here"}\n')
    with pytest.raises(RagtuneError, match=r"data.train: .*bad.jsonl: the first record has neither `messages` "
                                           r"nor `prompt`"):
        check(cfg(f"data.train={bad}"))
    with pytest.raises(RagtuneError, match=r"data.train 'missing.jsonl' does not exist"):
        check(cfg("data.train=missing.jsonl"))


def test_a_record_cut_before_its_answer_is_an_error_that_says_how_long_it_is(tiny_model_dir):
    import pyarrow as pa

    from jobs.finetune import _tokenize

    long = {"id": "r1", "prompt": "Passages: " + "word " * 20 + "Question: who?", "completion": "Ana"}
    batch = pa.Table.from_pylist([{"id": "r0", "prompt": "who?", "completion": "Ana"}, long])
    out = _tokenize(batch, tiny_model_dir, 512, "chat", False)
    assert len(out["input_ids"]) == 2
    with pytest.raises(RagtuneError, match=r"record r1: its answer starts at token \d+, past data.max_length = 32, "
                                           r"so nothing of it would be learned. Fix: raise data.max_length to at "
                                           r"least \d+"):
        _tokenize(batch, tiny_model_dir, 32, "chat", False)


def test_a_local_base_model_is_given_to_the_workers_as_an_absolute_path(tiny_model_dir, tmp_path, monkeypatch):
    """Ray Train's workers run in their own working directory: a relative folder would be read as a hub id there
    (found by running the README's `ragtune demo`, whose outputs are under the relative runs/demo)."""
    import shutil
    from pathlib import Path

    from jobs.finetune import resolve_base_model

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    got = resolve_base_model(cfg("model.name=models/tiny"), [])
    assert Path(got).is_absolute() and Path(got) == (tmp_path / "models" / "tiny").resolve()
    assert resolve_base_model(cfg("model.name=org/some-hub-model"), []) == "org/some-hub-model"  # a hub id stays
