import pytest

from sharding.chunking import Chunker, ChunkerSettings, count_special_tokens, embed_input

LONG = " ".join(
    f"Sentence number {i} talks about the unbelievably interdisciplinary researchers of Zalmaria." for i in range(80)
)


def ntok(tok, s):
    return len(tok.encode(s, add_special_tokens=False).ids)


def test_bert_tokenizer_adds_two_special_tokens(minilm):
    _, tok = minilm
    assert count_special_tokens(tok) == 2


@pytest.mark.parametrize("size,overlap", [(16, 0), (32, 8), (64, 16), (128, 32), (254, 32)])
def test_windows_fit_the_size_and_cover_the_text(minilm, size, overlap):
    _, tok = minilm
    chunks = Chunker(tok, size, overlap).chunk(LONG)
    assert len(chunks) > 1
    for ch in chunks:
        assert ch.n_tokens <= size
        assert ntok(tok, ch.text) == ch.n_tokens  # the embedder sees exactly what was counted
        assert LONG[ch.start:ch.end] == ch.text
    # every character that is not whitespace lies in some chunk
    covered = set()
    for ch in chunks:
        covered.update(range(ch.start, ch.end))
    assert all(i in covered for i, c in enumerate(LONG) if not c.isspace())
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_consecutive_chunks_overlap_by_about_the_overlap(minilm):
    _, tok = minilm
    chunks = Chunker(tok, 40, 10).chunk(LONG)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start < a.end  # they share text
        shared = LONG[b.start:a.end]
        assert 5 <= ntok(tok, shared) <= 10  # moved forward to a word start at most
    no_overlap = Chunker(tok, 40, 0).chunk(LONG)
    for a, b in zip(no_overlap, no_overlap[1:], strict=False):
        assert b.start >= a.end


def test_windows_do_not_cut_inside_words(minilm):
    _, tok = minilm
    chunks = Chunker(tok, 20, 4).chunk(LONG)
    assert len(chunks) > 5
    for ch in chunks:
        assert ch.end == len(LONG) or not (LONG[ch.end - 1].isalnum() and LONG[ch.end].isalnum())
        assert ch.start == 0 or not (LONG[ch.start - 1].isalnum() and LONG[ch.start].isalnum())


def test_a_word_longer_than_the_window_is_still_cut(minilm):
    _, tok = minilm
    word = "pneumonoultramicroscopicsilicovolcanoconiosis" * 2  # BERT maps words over 100 chars to [UNK]
    chunks = Chunker(tok, 8, 2).chunk(word)
    assert len(chunks) > 1 and all(c.n_tokens <= 8 for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(word)


def test_title_is_counted_in_every_window(minilm):
    _, tok = minilm
    title = "Zalmarian interdisciplinary research"
    chunks = Chunker(tok, 48, 8).chunk(LONG, title)
    without = Chunker(tok, 48, 8).chunk(LONG)
    assert len(chunks) > len(without)  # less room per window for text
    for ch in chunks:
        assert ch.n_tokens == ntok(tok, embed_input(title, ch.text)) <= 48


def test_long_title_is_cut_to_half_the_window(minilm):
    _, tok = minilm
    title = "A very long title " * 20
    chunks = Chunker(tok, 32, 4).chunk(LONG, title)
    assert all(ch.n_tokens <= 32 for ch in chunks)
    assert all(len(ch.text) > 0 for ch in chunks)


def test_title_can_be_left_out(minilm):
    _, tok = minilm
    c = Chunker(tok, 48, 8, prepend_title=False)
    assert [x.text for x in c.chunk(LONG, "Title")] == [x.text for x in c.chunk(LONG)]
    assert embed_input("Title", "body", prepend_title=False) == "body"
    assert embed_input("Title", "body") == "Title\nbody"


@pytest.mark.parametrize("text", ["", "   \n\t ", None])
def test_empty_documents_give_no_chunks(minilm, text):
    _, tok = minilm
    assert Chunker(tok, 32, 4).chunk(text, "title") == []


def test_short_document_is_one_chunk_with_its_whole_text(minilm):
    _, tok = minilm
    chunks = Chunker(tok, 64, 8).chunk("  Short text here.  ")
    assert len(chunks) == 1 and chunks[0].text == "Short text here."


def test_chunking_is_deterministic(minilm):
    _, tok = minilm
    a = Chunker(tok, 50, 10).chunk(LONG, "T")
    b = Chunker(tok, 50, 10).chunk(LONG, "T")
    assert a == b


def test_invalid_settings_are_refused(minilm):
    _, tok = minilm
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tok, 32, 32)
    with pytest.raises(ValueError, match="at least 8"):
        Chunker(tok, 4, 0)


def test_fingerprint_changes_with_every_setting():
    base = ChunkerSettings(size=128, overlap=16, prepend_title=True, tokenizer="r1")
    variants = [
        ChunkerSettings(size=129, overlap=16, prepend_title=True, tokenizer="r1"),
        ChunkerSettings(size=128, overlap=17, prepend_title=True, tokenizer="r1"),
        ChunkerSettings(size=128, overlap=16, prepend_title=False, tokenizer="r1"),
        ChunkerSettings(size=128, overlap=16, prepend_title=True, tokenizer="r2"),
        ChunkerSettings(size=128, overlap=16, prepend_title=True, tokenizer="r1", version=2),
    ]
    assert len({base.fingerprint(), *(v.fingerprint() for v in variants)}) == 6
    assert base.fingerprint() == ChunkerSettings(128, 16, True, "r1").fingerprint()
