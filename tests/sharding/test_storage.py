import logging
import re

import pytest

from configs.errors import RagtuneError
from sharding.storage import atomic_write_bytes, exists, list_dir, makedirs, read_bytes, resolve


@pytest.mark.parametrize("root", ["local", "file", "memory"])
def test_atomic_writes_and_listing_on_paths_and_uris(tmp_path, root):
    base = {"local": str(tmp_path), "file": f"file://{tmp_path}", "memory": "memory://ragtune-test"}[root]
    loc = resolve(base).join("sub")
    makedirs(loc)
    f = loc.join("x.bin")
    assert not exists(f)
    atomic_write_bytes(f, b"one")
    atomic_write_bytes(f, b"two")  # replaces
    assert read_bytes(f) == b"two"
    assert [i.base_name for i in list_dir(loc)] == ["x.bin"]  # no temporaries left behind
    assert f.uri == base + "/sub/x.bin"


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("out/emb")
    assert loc.is_local and loc.path == str(tmp_path / "out" / "emb") and loc.uri == "out/emb"


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(RagtuneError, match=r"nosuchscheme://x: no filesystem for this URI"):
        resolve("nosuchscheme://x")


def test_a_uri_keeps_its_query_at_the_end_when_joined():
    loc = resolve("s3://bucket/index?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1")
    f = loc.join("v-00002", "../v-00001", "shard-00000.faiss")
    assert f.uri == "s3://bucket/index/v-00001/shard-00000.faiss?endpoint_override=127.0.0.1:9000&scheme=http&" \
                    "region=us-east-1"
    assert f.path == "bucket/index/v-00001/shard-00000.faiss" and f.name == "shard-00000.faiss"
    assert f.parent.parent.uri == loc.uri and f.parent.parent.path == loc.path
    assert resolve("/data/what?x").join("a").path == "/data/what?x/a"  # a local path has no query


def test_credentials_are_taken_out_of_uris_in_messages_summaries_and_manifests():
    from configs.errors import redact

    u = "s3://AKIAEXAMPLE:wJalrXUtnFEMI%2Fsecret@bucket/index?endpoint_override=minio:9000&scheme=http"
    assert redact(f"index.path {u!r}: no index here") == \
        "index.path 's3://bucket/index?endpoint_override=minio:9000&scheme=http': no index here"
    assert redact("gs://bucket/x?session_token=abc&region=r&secret_key=z") == \
        "gs://bucket/x?session_token=***&region=r&secret_key=***"
    assert redact("/local/path@2 and user@example.org") == "/local/path@2 and user@example.org"
    assert "wJalr" not in str(RagtuneError(f"{u}: checksum mismatch"))
    loc = resolve(u)
    # a manifest records where its embeddings are without the credentials; reopened with those the user gave
    from sharding.storage import with_credentials_of

    assert with_credentials_of("s3://bucket/emb?scheme=http", loc) == "s3://AKIAEXAMPLE:wJalrXUtnFEMI%2Fsecret@" \
                                                                      "bucket/emb?scheme=http"
    assert with_credentials_of("s3://bucket/emb", resolve(u.replace("AKIAEXAMPLE:wJalrXUtnFEMI%2Fsecret@", ""))) \
        == "s3://bucket/emb"
    assert with_credentials_of("/data/emb", loc) == "/data/emb"
    assert loc.shown == "s3://bucket/index?endpoint_override=minio:9000&scheme=http" and "wJalr" in loc.uri


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port of 127.0.0.1 with a bucket: the URI of a folder in it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="ragtune-unit")
    yield f"s3://k:s@ragtune-unit/root?endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def test_writes_listing_and_exclusive_create_on_a_real_s3_server(s3_server, caplog):
    from sharding.storage import create_exclusive, delete_dir_if_empty, delete_file, list_files

    loc = resolve(s3_server).join("sub")
    f = loc.join("x.bin")
    assert not exists(f) and list_dir(loc) == []
    with caplog.at_level(logging.INFO, logger="werkzeug"):  # the server's log: a line per request
        atomic_write_bytes(f, b"one")
        atomic_write_bytes(f, b"two")
    # written in place (an upload is whole or absent on S3), never a temporary copied over: CopyObject stops at 5 GiB
    requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
    assert sum('"PUT /ragtune-unit/root/sub/x.bin?' in r for r in requests) == 2, requests
    assert not any(".tmp-" in r for r in requests), requests
    assert read_bytes(f) == b"two"
    assert [i.base_name for i in list_dir(loc)] == ["x.bin"]  # the temporary was moved, not left behind
    assert create_exclusive(loc.join("LOCK"), b"me") and not create_exclusive(loc.join("LOCK"), b"other")
    assert read_bytes(loc.join("LOCK")) == b"me"
    assert list_files(resolve(s3_server)) == ["sub/LOCK", "sub/x.bin"]
    delete_file(f)
    delete_file(loc.join("LOCK"))
    assert delete_dir_if_empty(loc) and not exists(loc.join("x.bin"))


def test_bm25_shard_arrays_are_written_in_place_on_s3_and_read_back(s3_server, caplog):
    import numpy as np

    from sharding.lexical import (
        ARRAYS,
        CorpusStats,
        LexicalParams,
        build_shard,
        read_lexical_file,
        tokenizer,
        write_lexical_file,
    )

    tokens = tokenizer(LexicalParams())(["cats chase mice", "dogs chase cats", "birds sing"])
    shard = build_shard(tokens, np.arange(3), CorpusStats.of(tokens), LexicalParams())
    loc = resolve(s3_server).join("lexical", "shard-00000")
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        sha, _ = write_lexical_file(shard, LexicalParams(), loc)
    requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
    written = {m.group(1) for r in requests if (m := re.search(r'"(?:PUT|POST) /ragtune-unit/root/([^? ]+)', r))}
    files = {k for k in written if not k.endswith("/")}  # folder markers aside
    assert files == {f"lexical/shard-00000/{f}" for f in ["shard.json", *ARRAYS.values()]}, requests  # no temporary
    back = read_lexical_file(loc, sha)
    q = tokenizer(LexicalParams())(["chase cats"])
    assert all(np.array_equal(a, b) for a, b in zip(back.search(q, 3), shard.search(q, 3), strict=True))


def test_a_missing_bucket_or_wrong_endpoint_is_one_line_without_the_credentials(s3_server):
    from configs.errors import user_error

    missing = s3_server.replace("ragtune-unit", "no-such-bucket")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(resolve(missing).join("x"), b"1")
    err = user_error(e.value)
    assert err is not None and "\n" not in str(err) and ":s@" not in str(err)
    assert str(err).startswith("object storage: the storage cannot be reached or read (") and "Fix:" in str(err)
