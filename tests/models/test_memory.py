"""The memory plan against hand-computed figures for public architectures (built on the meta device from their
configs) and against the bytes autograd really keeps on a tiny model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, Qwen2Config

from models.memory import TrainSettings, activation_bytes, deepspeed_model_states, fixes, model_facts, plan_memory

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2**30

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False)


@pytest.fixture(scope="module")
def llama():
    return model_facts(LlamaConfig(**LLAMA3_8B), "full", name="Llama-3-8B")


def test_parameter_counts_of_public_architectures(llama):
    # Llama-3-8B: a layer is q, o (4096^2 each), k, v (4096 x 1024: 8 kv heads of 128), the MLP (3 x 4096 x 14336)
    # and two norms; plus untied embeddings and lm_head (128256 x 4096 each) and the final norm
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert llama.params == 32 * layer + 2 * 128256 * 4096 + 4096 == 8_030_261_248  # "8.03B"
    assert llama.largest_layer == 128256 * 4096  # the embedding (or lm_head): what ZeRO-3 gathers at most
    # Qwen2.5-7B: q/k/v have biases; 4 kv heads of 128
    layer = (3584**2 + 3584) + 2 * (3584 * 512 + 512) + 3584**2 + 3 * 3584 * 18944 + 2 * 3584
    qwen = model_facts(Qwen2Config(**QWEN25_7B), "full")
    assert qwen.params == 28 * layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512  # "7.62B"
    # Mixtral-8x7B: 8 experts of 3 x 4096 x 14336 a layer, a 4096 x 8 router; the experts are one module
    layer = 2 * 4096**2 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336 + 4096 * 8 + 2 * 4096
    mixtral = model_facts(MixtralConfig(**MIXTRAL_8X7B), "full")
    assert mixtral.params == 32 * layer + 2 * 32000 * 4096 + 4096 == 46_702_792_704  # "46.7B"
    assert mixtral.largest_layer == 8 * 3 * 4096 * 14336 and (mixtral.experts, mixtral.experts_per_token) == (8, 2)


def test_lora_trainable_count_is_r_times_in_plus_out_per_target():
    lora = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ALL, r=16)
    per_layer = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert lora.trainable == 32 * per_layer == 41_943_040


def test_weights_and_zero3_full_finetuning_states_match_deepspeed(llama):
    P, Lp = 8_030_261_248, 128256 * 4096
    z2 = plan_memory(llama, TrainSettings(method="full", stage=2, workers=8, precision="bf16"))
    assert z2.weights == 2 * P  # bf16: 14.96 GiB on every GPU below ZeRO-3
    # ZeRO-2: 2 P + 18 P / N (16-bit grads 2, fp32 grads 4, fp32 master 4, Adam 8; all but the weights partitioned)
    assert z2.model_states == 2 * P + 18 * P // 8 == z2.deepspeed_estimate
    z3 = plan_memory(llama, TrainSettings(method="full", stage=3, workers=8, precision="bf16"))
    # ZeRO-3 over 8 GPUs: 18 P / N + 4 Lp (the gathered largest layer: its bf16 weights and gradients)
    assert z3.weights == 2 * P // 8 + 2 * Lp
    assert z3.model_states == 18 * P // 8 + 4 * Lp == 20_169_434_112 == z3.deepspeed_estimate  # 18.78 GiB
    # optimizer offload: the fp32 states go to the host; the GPU keeps the bf16 partition and the gathered layer
    off = plan_memory(llama, TrainSettings(method="full", stage=3, workers=8, offload=True))
    assert off.model_states == 2 * P // 8 + 4 * Lp == off.deepspeed_estimate
    assert off.host == 16 * P // 8


def test_lora_states_count_frozen_weights_as_weights_only():
    lora = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ALL, r=16)
    P, T = 8_030_261_248, 41_943_040
    plan = plan_memory(lora, TrainSettings(method="lora", stage=2, workers=4, precision="bf16", targets=tuple(ALL),
                                           r=16))
    assert (plan.weights, plan.gradients, plan.optimizer) == (2 * P, 6 * T // 4, 12 * T // 4)
    # DeepSpeed's estimator on the adapters, plus the frozen bf16 weights it does not know of
    assert plan.deepspeed_estimate == 2 * T + 18 * T // 4 + 2 * (P - T) == plan.model_states
    # fp32 on CPUs under ZeRO-2: the model's own fp32 adapters and DeepSpeed's fp32 partition copy of them
    cpu = plan_memory(lora, TrainSettings(stage=2, workers=2, precision="fp32", device="cpu", targets=tuple(ALL),
                                          r=16))
    assert (cpu.weights, cpu.gradients, cpu.optimizer) == (4 * P, (4 + 4) * T // 2, (4 + 8) * T // 2)
    assert cpu.deepspeed_estimate is None  # its estimators are for GPUs in mixed precision


def test_a_4bit_base_holds_its_linear_weights_in_nf4_and_the_rest_in_fp32():
    """QLoRA on Llama-3-8B: the 32 layers' Linear weights (7 projections) in NF4 with double quantization, 1/2 +
    1/64 + 1/4096 bytes a parameter; the embeddings, norms and lm_head in fp32 (prepare_model_for_kbit_training)."""
    lora = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ALL, r=16)
    linear = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert lora.quantizable == linear == 6_979_321_856  # lm_head is not quantized
    rest = 8_030_261_248 - linear  # embeddings + lm_head (2 x 128256 x 4096) and 65 norms of 4096
    assert rest == 2 * 128256 * 4096 + 65 * 4096
    q = plan_memory(lora, TrainSettings(stage=2, workers=4, precision="bf16", targets=tuple(ALL), r=16,
                                        quantization="4bit"))
    # linear / 2 + linear / 64 + linear / 4096 = 3,489,660,928 + 109,051,904 + 1,703,936
    assert q.weights == 3_600_416_768 + 4 * rest == 7_804_174_336  # 7.27 GiB, against 14.96 GiB in bf16
    assert q.weights < plan_memory(lora, TrainSettings(stage=2, workers=4, targets=tuple(ALL), r=16)).weights / 2
    assert q.deepspeed_estimate is None  # DeepSpeed's estimators know no quantized weights


def test_activations_of_a_stated_batch():
    facts = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ["q_proj", "v_proj"], r=8)
    s = TrainSettings(method="lora", precision="bf16", micro_batch=1, max_length=2048, targets=("q_proj", "v_proj"))
    h, f, V, tokens = 4096, 14336, 128256, 1 * 2048
    norm = 4 * h  # the fp32 input of each RMSNorm (its frozen weight needs no output kept)
    attention = 2 * h + 3 * 2 * h + 2 * h + 4 * 32  # q/v's input, q and k, v repeated to 32 heads, output, LSE
    mlp = 3 * 2 * f  # gate's output, SiLU's output, up's output (the frozen MLP keeps no inputs)
    lora = 2 * 2 * 8  # q and v's rank-8 intermediates
    per_layer = 2 * norm + attention + mlp + lora
    assert per_layer == 159_904
    parts = activation_bytes(facts, s)
    assert parts == {"layers": tokens * 32 * per_layer,  # 9.76 GiB
                     "logits": tokens * (norm + 4 * V),  # the fp32 log-probabilities: 1.01 GiB
                     "working": tokens * 8 * V}  # their gradients at the start of the backward: 1.96 GiB
    ckpt = activation_bytes(facts, TrainSettings(**{**s.__dict__, "checkpointing": True}))
    assert ckpt["layers"] == tokens * 32 * 2 * h and ckpt["recompute"] == tokens * per_layer
    assert sum(ckpt.values()) < 0.45 * sum(parts.values())
    # eager attention keeps the S x S softmax: 4 a S (fp32) + 2 a S (its bf16 cast) bytes a token and layer more
    eager = activation_bytes(facts, TrainSettings(**{**s.__dict__, "attention": "eager"}))
    assert eager["layers"] - parts["layers"] == tokens * 32 * (6 * 32 * 2048 - 4 * 32)


def test_the_plan_names_its_dominant_term():
    lora = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ["q_proj", "v_proj"], r=8)
    long = plan_memory(lora, TrainSettings(method="lora", stage=2, workers=4, micro_batch=4, max_length=4096))
    assert long.dominant == "activations" and "activations" in long.table()
    assert any(line.endswith("<- dominant") and "activations" in line for line in long.lines())
    short = plan_memory(lora, TrainSettings(method="lora", stage=2, workers=4, micro_batch=1, max_length=256))
    assert short.dominant == "weights"


def test_fixes_are_recomputed_plans_that_fit(llama):
    s = TrainSettings(method="full", stage=2, workers=8, micro_batch=2, max_length=4096, precision="bf16")
    plan = plan_memory(llama, s)
    assert plan.total > 80 * GiB
    found = fixes(llama, s, 80 * GiB, more_workers=16)
    assert found and all(float(f.rsplit("(", 1)[1].split()[0]) <= 80 for f in found)
    assert any(f.startswith("deepspeed.stage=3") for f in found)
    assert fixes(llama, s, 1 * GiB) == []  # nothing makes 8B full fine-tuning fit 1 GiB


def test_deepspeed_estimate_for_lora_under_zero3_counts_the_frozen_partition():
    lora = model_facts(LlamaConfig(**LLAMA3_8B), "lora", ALL, r=16)
    T, P, Lp = 41_943_040, 8_030_261_248, 128256 * 4096
    assert deepspeed_model_states(lora, 3, 4, False) == 4 * Lp + 18 * T // 4 + 2 * (P - T) // 4


@pytest.mark.parametrize("attn,method", [("sdpa", "full"), ("sdpa", "lora"), ("eager", "full")])
def test_the_activation_formula_is_what_autograd_keeps(attn, method):
    """On a tiny Llama in fp32, the plan's kept activations (layers + the head's log-probabilities) are within 3%
    of the bytes autograd saves for the backward (every saved tensor's storage once, parameters left out)."""
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=1000, tie_word_embeddings=False, attn_implementation=attn,
                         use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=ALL, task_type="CAUSAL_LM"))
    B, S = 2, 32
    ids = torch.randint(0, 1000, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -5:] = 0  # padding: the job always passes a mask
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    facts = model_facts(config, method, ALL, r=4)
    parts = activation_bytes(facts, TrainSettings(method=method, precision="fp32", micro_batch=B, max_length=S,
                                                  attention=attn, targets=tuple(ALL), r=4, device="cpu"))
    predicted = parts["layers"] + parts["logits"]
    assert predicted == pytest.approx(measured, rel=0.03)
