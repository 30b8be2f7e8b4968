import pytest

from configs.errors import RagtuneError
from models.sft import (
    IGNORE,
    Example,
    encode_raw,
    encode_record,
    flatten_blocks,
    is_validation,
    pack,
    pad_batch,
    pad_blocks,
    to_messages,
)

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


def test_padding_masks_pad_tokens():
    a, b = Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])
    batch = pad_batch([a, b], pad_id=0)
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"] == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_validation_split_is_stable_and_near_the_fraction():
    keys = [f"record {i}" for i in range(4000)]
    picked = [k for k in keys if is_validation(k, 0.1, seed=0)]
    assert picked == [k for k in keys if is_validation(k, 0.1, seed=0)]
    assert 300 < len(picked) < 500
    assert picked != [k for k in keys if is_validation(k, 0.1, seed=1)]
    assert not any(is_validation(k, 0.0, 0) for k in keys)


def test_packing_keeps_every_example_whole_and_marks_its_boundaries():
    a, b, c = Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [IGNORE, 7, 8, 9])
    blocks = pack([a, b, c], block=5)
    # longest first, each into the fullest block it fits: nothing is split or dropped
    assert [blk.input_ids for blk in blocks] == [[6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert [blk.position_ids for blk in blocks] == [[0, 1, 2, 3], [0, 1, 2, 0, 1]]
    # the first token of every example is not predicted from the one before it (another example's last)
    assert [blk.labels for blk in blocks] == [[IGNORE, 7, 8, 9], [IGNORE, 2, 3, IGNORE, 5]]
    padded = pad_blocks(blocks, pad_id=0)
    assert padded == {"input_ids": [[6, 7, 8, 9, 0], [1, 2, 3, 4, 5]],
                      "labels": [[IGNORE, 7, 8, 9, IGNORE], [IGNORE, 2, 3, IGNORE, 5]],
                      "position_ids": [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]}
    assert flatten_blocks(blocks)["position_ids"] == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert sorted(t for blk in blocks for t in blk.input_ids) == list(range(1, 10))
    assert [blk.input_ids for blk in pack([Example(list(range(7)), [1] * 7)], block=5)] == [[0, 1, 2, 3, 4]]

