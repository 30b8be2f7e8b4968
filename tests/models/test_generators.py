import torch

from models.generators import (
    TinySpec,
    build_tiny,
    linear_module_names,
    load_model,
    load_tokenizer,
    local_model_dir,
    lora_param_count,
)


def test_tiny_preset_is_an_ordinary_local_model_folder(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    assert tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>" and tok.chat_template
    assert model.config.vocab_size == len(tok)
    ids = tok("Any text at all, even unseen: ñ ✓", return_tensors="pt")["input_ids"]  # byte-level: never <unk>
    assert tok.decode(ids[0]) == "Any text at all, even unseen: ñ ✓"
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_build_is_deterministic_by_seed(tmp_path):
    texts = ["alpha beta gamma delta"] * 50
    a = load_model(str(build_tiny(tmp_path / "a", texts, TinySpec(seed=1))))
    b = load_model(str(build_tiny(tmp_path / "b", texts, TinySpec(seed=1))))
    c = load_model(str(build_tiny(tmp_path / "c", texts, TinySpec(seed=2))))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_model_on_a_uri_is_copied_to_a_local_cache(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setattr("models.generators.CACHE", tmp_path / "cache")
    local = local_model_dir(f"file://{tiny_model_dir}")
    assert local.startswith(str(tmp_path / "cache")) and load_tokenizer(f"file://{tiny_model_dir}") is not None
    assert local_model_dir(tiny_model_dir) == tiny_model_dir


def test_lora_targets_and_their_parameter_count(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                          "up_proj", "v_proj"]
    h, v = model.config.hidden_size, model.config.vocab_size
    assert lora_param_count(model, ["q_proj"], 8) == 2 * 8 * (h + h)  # 2 layers
    assert lora_param_count(model, ["lm_head"], 4) == 4 * (h + v)
