"""The fine-tuning job's setup, without Ray: configs, DeepSpeed dicts, LoRA checks, worker plans."""

import random

import pytest

from cluster.placement import NodeResources, plan_training
from configs.errors import RagtuneError
from configs.schema import ConfigError, FinetuneJobConfig, load_config
from jobs.finetune import (
    _collate,
    _tokenize,
    apply_lora,
    check,
    check_quantization,
    deepspeed_config,
    lr_lambda,
    n_tokens,
)
from models.sft import IGNORE, Block, Example, pack
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


# --- packing: every example in a block attends only to itself ------------------------------------------------------

def tiny_llama(attn: str, lora: bool):
    """A 2-layer Llama built from its config (random weights, fp32), optionally with LoRA on q/v/mlp."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                 init_lora_weights=False))  # B != 0: the adapter changes outputs
    return model


def random_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 9), rng.randint(1, 6)
        ids = [rng.randrange(3, 64) for _ in range(prompt + answer)]
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def rows(items) -> dict:
    """A micro batch as Ray Data hands it to the collate (a column per field)."""
    fields = ("input_ids", "labels", "position_ids") if isinstance(items[0], Block) else ("input_ids", "labels")
    return {k: [getattr(x, k) for x in items] for k in fields}


def per_example_losses(model, batch: dict) -> list[float]:
    """The mean loss over each sequence's label tokens, sequences told apart by restarting position ids (padding
    has no labels)."""
    import torch

    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none",
                                           ignore_index=IGNORE)
    pos = batch.get("position_ids", torch.arange(labels.shape[1] + 1).expand(labels.shape[0], -1))
    seq = (pos == 0).cumsum(1)[:, 1:]  # the sequence of each predicted token, in its row
    counted = labels != IGNORE
    return [float(ce[r][counted[r] & (seq[r] == k)].mean()) for r in range(ce.shape[0])
            for k in seq[r][counted[r]].unique().tolist()]


def split_block(block: Block) -> list[Example]:
    starts = [i for i, p in enumerate(block.position_ids) if p == 0] + [len(block.position_ids)]
    return [Example(block.input_ids[a:b], block.labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_a_packed_batch_gives_each_example_the_loss_it_has_alone(attn, lora):
    import torch

    model = tiny_llama(attn, lora)
    examples = random_examples(12)
    blocks = pack(examples, block=24)
    assert len(blocks) < len(examples) and any(b.position_ids.count(0) > 1 for b in blocks)
    # the examples in the order the blocks hold them, each alone: no padding, no mask, no neighbour
    order = [e for b in blocks for e in split_block(b)]
    alone = [per_example_losses(model, _collate(rows([e]), 0, "cpu"))[0] for e in order]
    packed = _collate(rows(blocks), 0, "cpu")
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == len(blocks)
    assert per_example_losses(model, packed) == pytest.approx(alone, abs=1e-5)
    flat = _collate(rows(blocks), 0, "cpu", flatten=True)  # flash-attention's form, here through sdpa/eager
    assert flat["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert per_example_losses(model, flat) == pytest.approx(alone, abs=1e-5)
    assert n_tokens(packed) == n_tokens(flat) == n_tokens(_collate(rows(order), 0, "cpu")) == flat["input_ids"].numel()

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    # the micro batch's loss and gradients: packed = the same examples padded one per row
    ref_loss, ref_grads = loss_and_grads(_collate(rows(order), 0, "cpu"))
    loss, grads = loss_and_grads(packed)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads, strict=True))
    # plain concatenation (the old packing: attention across the examples of a block) does not
    concat = [Example(b.input_ids, b.labels) for b in blocks]
    assert abs(loss_and_grads(_collate(rows(concat), 0, "cpu"))[0] - ref_loss) > 1e-3


def test_packing_in_the_job_keeps_every_record_and_its_boundaries(tiny_model_dir):
    import pyarrow as pa

    records = [{"prompt": f"What is the capital of Zal{i}?", "completion": f"Ophir{i % 7}"} for i in range(40)]
    table = pa.Table.from_pylist(records)
    plain = _tokenize(table, tiny_model_dir, 64, "chat", packing=False)
    packed = _tokenize(table, tiny_model_dir, 64, "chat", packing=True)
    assert set(packed) == {"input_ids", "labels", "position_ids"} and len(packed["input_ids"]) < len(records)
    assert all(len(ids) <= 64 for ids in packed["input_ids"])
    # every record's tokens are there, whole: as many sequences as records, as many tokens
    starts = sum(p.count(0) for p in packed["position_ids"])
    assert starts == len(records)
    assert sorted(map(tuple, (e.input_ids for b in packed_blocks(packed) for e in split_block(b)))) == sorted(
        map(tuple, plain["input_ids"]))
    batch = _collate(packed, 0, "cpu")
    assert n_tokens(batch) == sum(len(ids) for ids in plain["input_ids"]) < batch["input_ids"].numel()


def packed_blocks(cols: dict) -> list[Block]:
    return [Block(*x) for x in zip(cols["input_ids"], cols["labels"], cols["position_ids"], strict=True)]


# --- QLoRA: a 4-bit base, chosen by config, on GPU workers only -----------------------------------------------------

def gpu_plan(n: int = 2):
    return plan_training([NodeResources(cpus=16, gpus=n)], n)


def test_qlora_is_refused_with_full_fine_tuning_or_zero3_in_the_config():
    with pytest.raises(ConfigError, match=r"model.quantization = '4bit' .* train.method = 'full'.*Fix: set "
                                          r"train.method: lora"):
        cfg("model.quantization=4bit", "train.method=full")
    with pytest.raises(ConfigError, match=r"ZeRO stage 3 \(deepspeed.stage = 3\).*bnb_4bit_quant_storage.*"
                                          r"Fix: use deepspeed.preset zero2"):
        cfg("model.quantization=4bit", "deepspeed.stage=3")
    assert cfg("model.quantization=4bit").model.quantization == "4bit"
    with pytest.raises(ConfigError, match="model.quantization"):
        cfg("model.quantization=8bit")


def test_qlora_is_refused_before_launch_on_cpus_without_bitsandbytes_or_under_a_zero3_preset(monkeypatch):
    cpu_plan = plan_training([NodeResources(cpus=4)], 2)
    check_quantization(cfg(), cpu_plan)  # no quantization: nothing to refuse
    with pytest.raises(RagtuneError, match=r"model.quantization = '4bit' needs GPU workers.*2 CPU worker\(s\).*"
                                           r"Fix: set model.quantization: none"):
        check_quantization(cfg("model.quantization=4bit"), cpu_plan)
    import jobs.finetune

    monkeypatch.setattr(jobs.finetune, "qlora_available", lambda: "bitsandbytes is not installed. Fix: pip install "
                                                                   "'ragtune[qlora]' (on the GPU nodes)")
    with pytest.raises(RagtuneError, match=r"'4bit': bitsandbytes is not installed. Fix: pip install 'ragtune\[qlora"):
        check_quantization(cfg("model.quantization=4bit"), gpu_plan())
    monkeypatch.setattr(jobs.finetune, "qlora_available", lambda: None)
    check_quantization(cfg("model.quantization=4bit"), gpu_plan())  # zero2: allowed
    check_quantization(cfg("model.quantization=4bit", "deepspeed.enabled=false"), gpu_plan())  # DDP: allowed
    for preset in ("zero3", "zero3-offload"):
        with pytest.raises(RagtuneError, match=rf"ZeRO stage 3 \(deepspeed.preset = '{preset}'\)"):
            check_quantization(cfg("model.quantization=4bit", f"deepspeed.preset={preset}"), gpu_plan())


def test_qlora_config_is_nf4_double_quantized_computing_in_the_training_precision():
    import torch

    from models.generators import qlora_config

    q = qlora_config(torch.bfloat16)  # built here, without bitsandbytes or a GPU
    assert q.load_in_4bit and not q.load_in_8bit
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == ("nf4", True,
                                                                                             torch.bfloat16)


@pytest.mark.skipif(__import__("torch").accelerator.is_available(), reason="checks the refusal without a GPU")
def test_a_4bit_base_is_refused_in_a_process_without_a_gpu(tiny_model_dir):
    from models.generators import load_model

    with pytest.raises(RagtuneError, match=r"model.quantization = '4bit': bitsandbytes is not installed|"
                                           r"model.quantization = '4bit' needs a GPU"):
        load_model(tiny_model_dir, quantization="4bit")


@pytest.mark.gpu
def test_qlora_base_is_4bit_and_only_the_adapter_learns_on_a_gpu(tiny_model_dir):
    import torch

    pytest.importorskip("bitsandbytes")
    from jobs.finetune import setup_model

    c = cfg(f"model.name={tiny_model_dir}", "model.quantization=4bit", "lora.target_modules=[q_proj,v_proj,up_proj]")
    model, tok, _ = setup_model(c, tiny_model_dir, "bf16", "nccl", None)
    device = torch.device("cuda", torch.cuda.current_device())
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    examples = [Example(tok("What is the capital of Zal1? Ophir1.")["input_ids"], tok("What is the capital of "
                                                                                        "Zal1? Ophir1.")["input_ids"])]
    batch = _collate(rows(pack(examples * 8, block=64)), tok.pad_token_id, device)
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
