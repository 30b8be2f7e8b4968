import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharding.corpus import CorpusError, list_corpus, preflight, text_file_document, to_documents


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_lists_supported_files_recursively_and_skips_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    pq.write_table(pa.table({"text": ["y"]}), tmp_path / "sub" / "b.parquet")
    (tmp_path / "sub" / "c.md").write_text("# T\nbody")
    (tmp_path / ".hidden.jsonl").write_text("{}")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.csv").write_text("a,b")
    corpus = list_corpus(str(tmp_path))
    assert [(f.rel, f.kind) for f in corpus.files] == [("a.jsonl", "jsonl"), ("sub/b.parquet", "parquet"),
                                                       ("sub/c.md", "text")]
    assert corpus.total_bytes == sum(f.size for f in corpus.files) > 0


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    before = list_corpus(str(f)).fingerprint()
    assert list_corpus(str(f)).fingerprint() == before
    write_jsonl(f, [{"text": "xy"}])
    assert list_corpus(str(f)).fingerprint() != before


def test_missing_path_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"nope.jsonl' does not exist"):
        list_corpus(str(tmp_path / "nope.jsonl"))


def test_folder_without_documents_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CorpusError, match="holds no .jsonl"):
        list_corpus(str(tmp_path))


def test_unsupported_file_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CorpusError, match="not a supported file"):
        list_corpus(str(tmp_path / "x.csv"))


def test_preflight_reports_every_bad_file_at_once(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    write_jsonl(tmp_path / "notext.jsonl", [{"body": "x", "id": 1}])
    (tmp_path / "array.json").write_text('[{"text": "a"}]')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    pq.write_table(pa.table({"content": ["y"]}), tmp_path / "cols.parquet")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(CorpusError) as e:
        preflight(list_corpus(str(tmp_path)), "text")
    msg = str(e.value)
    assert msg.startswith("6 corpus files cannot be used")
    assert "notext.jsonl: the first record has no `text` field (fields: body, id)" in msg
    assert "array.json: a JSON array, not JSON Lines" in msg
    assert "broken.jsonl: line 1 is not JSON" in msg
    assert "cols.parquet: no `text` column (columns: content)" in msg
    assert "latin1.txt: not UTF-8" in msg
    assert "fake.parquet: cannot be read as parquet" in msg
    assert "good.jsonl" not in msg


def test_preflight_counts_parquet_rows_and_refuses_empty_corpus(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "a.parquet")
    assert preflight(list_corpus(str(tmp_path / "a.parquet")), "text") == 3
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("\n\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty" / "e.parquet")
    with pytest.raises(CorpusError, match="the corpus is empty"):
        preflight(list_corpus(str(tmp_path / "empty")), "text")


def test_an_id_field_in_no_record_is_refused_when_the_records_name_their_ids_otherwise(tmp_path, caplog):
    # a BEIR corpus (`_id`) embedded with the default id_field `id`: every id would silently be a content hash
    write_jsonl(tmp_path / "beir.jsonl", [{"_id": "d1", "title": "T", "text": "x"}])
    pq.write_table(pa.table({"doc_id": ["d2"], "text": ["y"]}), tmp_path / "b.parquet")
    corpus = list_corpus(str(tmp_path))
    with pytest.raises(CorpusError) as e:
        preflight(corpus, "text", "id")
    assert e.value.param == "corpus.id_field"
    assert "corpus.id_field = 'id' is in no record, but the records have `_id`, `doc_id`" in e.value.message
    assert "Fix: set corpus.id_field: _id" in e.value.message
    assert preflight(corpus, "text", "_id") is None  # one file that has the field is enough
    preflight(corpus, "text", None)  # null: ids from the content, on purpose
    with pytest.raises(CorpusError, match="the records have `doc_id`"):
        preflight(list_corpus(str(tmp_path / "b.parquet")), "text", "_id")
    # no id-like field at all: a warning, and ids from the content
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "p.jsonl", [{"text": "z", "lang": "en"}])
    with caplog.at_level("WARNING", logger="ragtune.corpus"):
        preflight(list_corpus(str(tmp_path / "plain")), "text", "id")
    assert "corpus.id_field = 'id' is in no record (fields: lang, text)" in caplog.text


def test_records_become_documents_with_metadata_and_stable_ids():
    t = pa.table({"id": [7, None, None], "title": ["T", None, None], "text": ["hello", "same", "same"],
                  "lang": ["en", "fr", None], "score": [1.5, None, 2.0]})
    docs = to_documents(t, "text", "id", "title").to_pylist()
    assert docs[0] == {"doc_id": "7", "title": "T", "text": "hello", "metadata": '{"lang": "en", "score": 1.5}'}
    assert docs[1]["doc_id"] == docs[2]["doc_id"] and docs[1]["doc_id"].startswith("h")  # from the content
    assert json.loads(docs[2]["metadata"]) == {"lang": None, "score": 2.0}


def test_records_without_text_become_empty_documents():
    docs = to_documents(pa.table({"id": ["a"], "body": ["x"]}), "text", "id", "title").to_pylist()
    assert docs == [{"doc_id": "a", "title": None, "text": "", "metadata": '{"body": "x"}'}]


def test_text_files_are_documents_titled_by_their_first_heading():
    doc = text_file_document("guide/intro.md", b"Intro line\n\n## Not this\n# The Title #\nbody")
    assert doc["doc_id"] == "guide/intro.md" and doc["title"] == "The Title"
    assert text_file_document("a.txt", b"# not markdown")["title"] is None


def test_corpus_on_an_fsspec_uri():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus-test/a.jsonl", b'{"text": "hello"}\n')
    fs.pipe("/corpus-test/b.jsonl", b'{"body": "no text"}\n')
    corpus = list_corpus("memory://corpus-test")
    assert [f.uri for f in corpus.files] == ["memory://corpus-test/a.jsonl", "memory://corpus-test/b.jsonl"]
    with pytest.raises(CorpusError, match=r"memory://corpus-test/b.jsonl: the first record has no `text`"):
        preflight(corpus, "text")
