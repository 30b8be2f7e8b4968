"""`ragtune search` / `eval-retrieval` pieces that need no index build: the query model and parameters."""

import pytest

from configs.errors import RagtuneError
from jobs.search import _params
from models.embedders import QueryEncoder, check_query_model
from sharding.manifest import IndexManifest


def manifest(**model):
    return IndexManifest(version="v-00001", factory="IDMap2,Flat", kind="flat", reason="", metric="inner_product",
                         dim=384, normalize=True, ntotal=1, shards=[], model=model)


def test_another_model_revision_or_dimension_is_refused(minilm):
    spec, _ = minilm
    check_query_model(manifest(name=spec.name, revision=spec.revision), spec, 384)
    with pytest.raises(RagtuneError, match=r"built with all-MiniLM-L6-v2 revision sha256:other .* would not match"):
        check_query_model(manifest(name=spec.name, revision="sha256:other"), spec)
    with pytest.raises(RagtuneError, match=r"gives vectors of dimension 384 but the index holds dimension 768"):
        check_query_model(manifest(name=spec.name, revision=spec.revision).model_copy(update={"dim": 768}), spec, 384)


def test_query_encoder_refuses_before_loading_the_model(minilm):
    with pytest.raises(RagtuneError, match="revision"):
        QueryEncoder(manifest(name="all-MiniLM-L6-v2", revision="sha256:other"))


def test_param_overrides():
    assert _params(["nprobe=64", "efSearch = 128"]) == {"nprobe": 64, "efSearch": 128}
    with pytest.raises(RagtuneError, match=r"--param 'nprobe': expected name=integer"):
        _params(["nprobe"])
