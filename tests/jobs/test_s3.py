"""embed -> index -> serve -> `index add` against a real S3-compatible server on 127.0.0.1 (moto's standalone
server: MinIO's server is not on the package registries), through the URIs users write.

Two ways of naming the endpoint, as docs/index.md says: in the URI (``s3://KEY:SECRET@bucket/path?endpoint_override=
127.0.0.1:PORT&scheme=http&region=us-east-1``), and with the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) and a plain ``s3://bucket/path``. The jobs run on the session's local Ray (workers read and
write the bucket), the app on Ray Serve; the commands of the second part run as a user runs them (the real CLI in a
subprocess whose only configuration is the environment). The credentials of the URI never appear in what is
printed, logged, written to the bucket, or answered.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from configs.schema import EmbedJobConfig, IndexJobConfig, ServeJobConfig
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # Ray Data, Ray Serve and two CLI runs: minutes

BUCKET = "ragtune-ci"
KEY, SECRET = "ragtune-test-key", "ragtune-test-secret-0123456789"
N_DOCS = 40
NEW = [{"_id": "new0", "title": "Flumoxed gardening",
        "text": "Flumoxed gardening grows violet tomatoes under ultraviolet lamps on the moon of Kepler-22."},
       {"_id": "new1", "title": "Zorvex trophy",
        "text": "In 2031 the Zorvex commission renamed its glass trophy after the sculptor Ilse Varnhagen."}]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port of 127.0.0.1 with one empty bucket: its ``host:port``."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1", aws_access_key_id=KEY,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def uri(endpoint: str, key: str) -> str:
    """What a user writes to name an S3-compatible server in the URI itself, credentials included."""
    return f"s3://{KEY}:{SECRET}@{BUCKET}/{key}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def put(endpoint: str, key: str, rows: list[dict]) -> None:
    from sharding.storage import atomic_write_bytes, resolve

    atomic_write_bytes(resolve(uri(endpoint, key)), "".join(json.dumps(r) + "\n" for r in rows).encode())


def bucket_text(endpoint: str) -> str:
    """Every small object of the bucket, as text: what the jobs wrote (manifests, docstore rows, ...)."""
    import boto3

    c = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1", aws_access_key_id=KEY,
                     aws_secret_access_key=SECRET)
    out = []
    for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        out.append(o["Key"])
        if o["Size"] < 1 << 20:
            out.append(c.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read().decode("utf-8", "replace"))
    return "\n".join(out)


@pytest.fixture(scope="module")
def built(s3, ray_2_cpus, squad_retrieval):
    """A corpus of SQuAD paragraphs in the bucket, embedded and indexed there by the real jobs on Ray."""
    from jobs.embed import run as embed
    from jobs.index import run as index

    with open(squad_retrieval / "corpus.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(N_DOCS)]
    put(s3, "corpus/squad.jsonl", rows)
    es = embed(EmbedJobConfig.model_validate({
        "corpus": {"path": uri(s3, "corpus/squad.jsonl"), "id_field": "_id"}, "chunk": {"size": None},
        "output": {"path": uri(s3, "emb"), "num_parts": 1}}))
    ix = index(IndexJobConfig.model_validate({"embeddings": {"path": uri(s3, "emb")},
                                              "index": {"path": uri(s3, "index"), "kind": "Flat", "shards": 2}}))
    return rows, es, ix


@pytest.mark.timeout(300)
def test_embed_index_serve_and_add_through_s3_uris_with_the_endpoint_in_the_uri(s3, built, tiny_model_dir, capsys,
                                                                                caplog):
    import requests
    from ray import serve

    from jobs.cli import main
    from serving.app import ServeAppArgs, build_app
    from tests.serving.test_app import free_port

    rows, es, ix = built
    assert es.docs == N_DOCS and ix.version == "v-00001" and ix.ntotal == es.chunks
    assert SECRET not in json.dumps(es.__dict__, default=str) + json.dumps(ix.__dict__, default=str)

    # serve: the searcher replicas open the index from the bucket (S3 has no mmap: read into memory)
    port = free_port()
    cfg = ServeJobConfig.model_validate({
        "index": {"path": uri(s3, "index"), "poll_interval_s": None},
        "embedder": {"max_batch_size": 8, "num_cpus": 0.2},
        "shards": {"layout": "fused", "num_cpus": 0.2},
        "generator": {"model": tiny_model_dir, "name": "tiny", "defaults": {"max_tokens": 4}, "num_cpus": 0.2},
        "http": {"port": port}, "auth": {"api_keys": [], "api_keys_env": None}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(ServeAppArgs(config=cfg.model_dump(mode="json"))), name="ragtune-s3", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        probe = rows[7]["text"].split(". ")[0]  # a sentence of one paragraph: that paragraph comes first
        r = requests.post(f"{url}/v1/search", json={"query": probe, "k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.text
        assert r.json()["data"][0]["doc_id"] == rows[7]["_id"] and r.json()["version"] == "v-00001"
        health = requests.get(f"{url}/healthz", timeout=30).text
        assert SECRET not in body + health and KEY not in body + health

        # `index add` of two new documents into the bucket's index, then the app reloads and finds them
        put(s3, "updates/new.jsonl", NEW)
        assert main(["index", "add", "-i", uri(s3, "index"), "--corpus", uri(s3, "updates/new.jsonl")]) == 0
        s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (s["docs_added"], s["version"]) == (2, "v-00002")
        r = requests.post(f"{url}/admin/reload", timeout=120)
        assert r.status_code == 200, r.text
        r = requests.post(f"{url}/v1/search", json={"query": "who renamed the glass trophy in 2031?", "k": 3},
                          timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == "v-00002" and r.json()["data"][0]["doc_id"] == "new1"
        body += r.text
    finally:
        serve.shutdown()  # not only the app: Serve's proxy on this test's port too (the next module starts its own)
    out = capsys.readouterr()
    said = out.out + out.err + caplog.text + body + json.dumps(s)
    assert SECRET not in said
    assert SECRET not in bucket_text(s3)  # manifests name where they came from without the credentials


@pytest.mark.timeout(300)
def test_the_cli_with_the_standard_aws_environment_variables(s3, built):
    """A plain s3://bucket/path and the environment a user (or a pod) sets: `index add` and `search`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=f"http://{s3}", AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(REPO))
    put(s3, "updates/env.jsonl", [{"_id": "env0", "title": "Quillwort",
                                   "text": "The quillwort festival of Tarnmouth floats paper lanterns on the fen."}])

    def ragtune(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "Traceback" not in p.stderr and SECRET not in p.stdout + p.stderr
        return p.stdout

    # --ray-above 0: embedded by the embed job on the local Ray the command starts, whose workers read and write
    # the bucket with the same environment (staged under the index root, removed after)
    out = ragtune("index", "add", "-i", f"s3://{BUCKET}/index", "--corpus", f"s3://{BUCKET}/updates/env.jsonl",
                  "--ray-above", "0")
    s = json.loads(out.strip().splitlines()[-1])
    assert (s["docs_added"], s["embedded_by"]) == (1, "ray data (the embed job)")
    assert "index/_staging/" not in bucket_text(s3)
    out = ragtune("search", "-i", f"s3://{BUCKET}/index", "--json", "-k", "3",
                  "where are paper lanterns floated on the fen?", "Which NFL team won Super Bowl 50?")
    lanterns, nfl = json.loads(out)
    assert lanterns["results"][0]["doc_id"] == "env0"  # the document `index add` just put in the bucket's index
    assert {r["doc_id"] for r in nfl["results"]} <= {r["_id"] for r in built[0]}
