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
