"""API keys: bearer tokens from the config and an environment variable, compared as sha256 digests (so only
digests travel to the replicas), in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable


def hash_key(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def api_key_hashes(keys: Iterable[str], env: str | None) -> set[str]:
    """sha256 of every key configured: the config's list and the environment variable (comma-separated)."""
    found = [k for k in keys if k.strip()]
    if env and os.environ.get(env):
        found += [k for k in os.environ[env].split(",") if k.strip()]
    return {hash_key(k) for k in found}


def key_matches(token: str, digests: Iterable[str]) -> bool:
    """Whether ``token`` is one of the keys (compared digest to digest, in constant time per key)."""
    digest = hash_key(token)
    return any(hmac.compare_digest(digest, d) for d in digests)
