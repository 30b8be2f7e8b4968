"""The batched decode loop on the tiny model: batching, adapters, sampling, stops and streaming are checked
against plain transformers / PEFT generation, which is the reference."""

import pytest
import torch

from serving.generation import Decoder, GenRequest, SamplingParams

PROMPTS = ["What is the capital of Zal3?", "Where was Ana born? In", "A much longer question, about Zal1 and Zal2 "
                                                                    "and where Ana was born?"]


def save_lora(model_dir, out, alpha, targets):
    """A LoRA adapter of a model with random (non-zero) weights, so that it changes the output."""
    from peft import LoraConfig, get_peft_model

    from models.generators import load_model

    torch.manual_seed(1)
    model = get_peft_model(load_model(model_dir), LoraConfig(r=8, lora_alpha=alpha, init_lora_weights=False,
                                                             target_modules=targets))
    model.save_pretrained(out)
    return str(out)


def decoder_with(model_dir, adapter, adapter_dir):
    d = Decoder.load(model_dir, "cpu", "auto", None, 1)
    d.add_adapter(adapter, adapter_dir)
    return d


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter", 64, ["q_proj", "v_proj", "lm_head"])


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, lora_dir):
    return decoder_with(tiny_model_dir, "lora", lora_dir)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def reference(model, tok, prompt, n):
    """Greedy continuation by transformers' own generate (one sequence, no padding)."""
    x = torch.tensor([ids(tok, prompt)])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    return out[0, x.shape[1]:].tolist()


def test_a_batch_of_base_and_adapter_rows_equals_generating_each_alone(decoder, tiny_model_dir, lora_dir):
    from peft import PeftModel

    from models.generators import load_model

    tok = decoder.tokenizer
    p = SamplingParams(max_tokens=10)
    reqs = [GenRequest(ids(tok, PROMPTS[0]), p), GenRequest(ids(tok, PROMPTS[2]), p, "lora"),
            GenRequest(ids(tok, PROMPTS[1]), p), GenRequest(ids(tok, PROMPTS[0]), p, "lora")]
    out = decoder.generate(reqs)
    base = load_model(tiny_model_dir).eval()
    want_base = [tok.decode(reference(base, tok, PROMPTS[i], 10)) for i in (0, 1)]
    peft = PeftModel.from_pretrained(load_model(tiny_model_dir), lora_dir).eval()
    want_lora = [tok.decode(reference(peft, tok, PROMPTS[i], 10)) for i in (2, 0)]
    assert [o.text for o in out] == [want_base[0], want_lora[0], want_base[1], want_lora[1]]
    assert out[0].text != out[3].text  # the adapter changes the answer to the same prompt
    assert all(o.finish_reason == "length" and o.completion_tokens == 10 for o in out)
    assert [o.prompt_tokens for o in out] == [len(r.prompt_ids) for r in reqs]


def test_streamed_deltas_add_up_to_the_text_and_stop_sequences_cut_it(decoder):
    tok = decoder.tokenizer
    prompt = ids(tok, PROMPTS[0])
    [full] = decoder.generate([GenRequest(prompt, SamplingParams(max_tokens=16))])
    pieces, last = [], None
    for [ev] in decoder.stream([GenRequest(prompt, SamplingParams(max_tokens=16))]):
        if ev is not None:
            pieces.append(ev.text)
            last = ev
    assert "".join(pieces) == full.text and last.finish_reason == "length" and len(pieces) == 16
    stop = full.text[5:8]  # a stop sequence that occurs in the text
    assert stop and stop in full.text
    [cut] = decoder.generate([GenRequest(prompt, SamplingParams(max_tokens=16, stop=(stop,)))])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    streamed = "".join(ev.text for [ev] in decoder.stream([GenRequest(prompt, SamplingParams(16, stop=(stop,)))])
                       if ev is not None)
    assert streamed == cut.text  # the held-back start of the stop sequence is never sent


def test_sampling_is_reproducible_by_seed_and_top_p_near_zero_is_greedy(decoder):
    tok = decoder.tokenizer
    prompt = ids(tok, PROMPTS[1])
    hot = [decoder.generate([GenRequest(prompt, SamplingParams(12, temperature=1.5, seed=s))])[0].text
           for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2]
    [greedy] = decoder.generate([GenRequest(prompt, SamplingParams(12))])
    [nucleus] = decoder.generate([GenRequest(prompt, SamplingParams(12, temperature=1.0, top_p=1e-6, seed=3))])
    assert nucleus.text == greedy.text


def test_rows_finish_on_their_own_budget_and_the_context_limit(decoder):
    tok = decoder.tokenizer
    short, long = GenRequest(ids(tok, PROMPTS[0]), SamplingParams(3)), GenRequest(ids(tok, PROMPTS[1]),
                                                                                 SamplingParams(9))
    steps = list(decoder.stream([short, long]))
    assert len(steps) == 9 and steps[2][0].finish_reason == "length" and all(s[0] is None for s in steps[3:])
    assert steps[8][1].finish_reason == "length" and steps[8][1].completion_tokens == 9
    near = ids(tok, "x " * 600)[: decoder.context - 4]  # 4 positions left in the context
    [out] = decoder.generate([GenRequest(near, SamplingParams(100))])
    assert out.finish_reason == "length" and out.completion_tokens == 4
    with pytest.raises(Exception, match="does not fit the context"):
        decoder.generate([GenRequest(ids(tok, "x " * 600)[: decoder.context], SamplingParams(5))])
    with pytest.raises(Exception, match="not loaded"):
        decoder.generate([GenRequest(ids(tok, "x"), SamplingParams(5), "other")])


def test_evicting_adapters_in_any_order_leaves_the_others_and_then_the_base_answering(tiny_model_dir, lora_dir,
                                                                                       tmp_path):
    """What a Generator's LRU does when it holds its maximum: the first adapter loaded (PEFT's active one) is
    removed while another stays; then the last one, which leaves the bare base; then one is loaded again. Each
    answer equals that of a decoder that never held the removed ones."""
    other_dir = save_lora(tiny_model_dir, tmp_path / "other", 32, ["q_proj", "v_proj"])
    d = decoder_with(tiny_model_dir, "lora", lora_dir)
    d.add_adapter("other", other_dir)
    tok = d.tokenizer

    def answer(dec, adapter):
        return dec.generate([GenRequest(ids(tok, PROMPTS[0]), SamplingParams(max_tokens=8), adapter)])[0].text

    fresh = decoder_with(tiny_model_dir, "other", other_dir)
    want = {"other": answer(fresh, "other"), None: answer(fresh, None), "lora": answer(decoder_with(
        tiny_model_dir, "lora", lora_dir), "lora")}
    assert len(set(want.values())) == 3
    d.remove_adapter("lora")  # the active one
    assert d.adapters == ["other"] and answer(d, "other") == want["other"] and answer(d, None) == want[None]
    d.remove_adapter("other")  # the last one
    assert d.adapters == [] and d.peft is None and answer(d, None) == want[None]
    d.add_adapter("lora", lora_dir)
    assert d.adapters == ["lora"] and answer(d, "lora") == want["lora"] and answer(d, None) == want[None]
