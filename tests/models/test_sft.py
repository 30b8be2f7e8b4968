import pytest

from configs.errors import RagtuneError
from models.sft import IGNORE, Example, encode_raw, encode_record, is_validation, pack, pad_batch, to_messages

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Where was Ana born?"},
                     {"role": "assistant", "content": "In Ophir."},
                     {"role": "user", "content": "And Bo?"},
                     {"role": "assistant", "content": "In Zal."}]}


def answer_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])


def test_chat_template_renders_every_turn(tiny_tokenizer):
    ex = encode_record(tiny_tokenizer, CHAT, 512)
    assert tiny_tokenizer.decode(ex.input_ids) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhere was Ana born?<|end|>\n<|assistant|>\nIn Ophir.<|end|>\n"
        "<|user|>\nAnd Bo?<|end|>\n<|assistant|>\nIn Zal.<|end|>\n")


def test_loss_is_masked_to_every_answer(tiny_tokenizer):
    ex = encode_record(tiny_tokenizer, CHAT, 512)
    assert answer_text(tiny_tokenizer, ex) == "In Ophir.<|end|>\nIn Zal.<|end|>\n"
    assert len(ex.labels) == len(ex.input_ids)
    assert all(lab in (IGNORE, i) for i, lab in zip(ex.input_ids, ex.labels, strict=True))


def test_prompt_completion_is_one_user_and_one_assistant_turn(tiny_tokenizer):
    ex = encode_record(tiny_tokenizer, {"prompt": "Capital of Zal?", "completion": "Ophir"}, 512)
    assert answer_text(tiny_tokenizer, ex) == "Ophir<|end|>\n"
    assert tiny_tokenizer.decode(ex.input_ids).startswith("<|user|>\nCapital of Zal?<|end|>\n<|assistant|>\n")


def test_raw_template_and_truncation(tiny_tokenizer):
    ex = encode_raw(tiny_tokenizer, "Capital of Zal? ", "Ophir", 512)
    assert answer_text(tiny_tokenizer, ex) == "Ophir<|end|>"
    assert ex.input_ids[0] == tiny_tokenizer.bos_token_id and ex.labels[0] == IGNORE
    short = encode_record(tiny_tokenizer, CHAT, 10)
    assert len(short.input_ids) == len(short.labels) == 10


def test_bad_records_name_the_problem():
    with pytest.raises(RagtuneError, match=r"line 3: needs `messages`, or `prompt` and `completion` \(fields: text\)"):
        to_messages({"text": "x"}, "line 3")
    with pytest.raises(RagtuneError, match="the last message must be the assistant's answer"):
        to_messages({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(RagtuneError, match="non-empty list"):
        to_messages({"messages": []})


def test_padding_masks_pad_tokens_and_packing_keeps_masks():
    a, b = Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])
    batch = pad_batch([a, b], pad_id=0)
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"] == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    blocks = pack([a, b, Example([5, 6, 7], [IGNORE, IGNORE, 7])], block=3)
    assert [blk.input_ids for blk in blocks] == [[1, 2, 3], [4, 5, 6]]  # the remainder [7] is dropped
    assert [blk.labels for blk in blocks] == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_validation_split_is_stable_and_near_the_fraction():
    keys = [f"record {i}" for i in range(4000)]
    picked = [k for k in keys if is_validation(k, 0.1, seed=0)]
    assert picked == [k for k in keys if is_validation(k, 0.1, seed=0)]
    assert 300 < len(picked) < 500
    assert picked != [k for k in keys if is_validation(k, 0.1, seed=1)]
    assert not any(is_validation(k, 0.0, 0) for k in keys)
