"""Regenerate ``kuberay-crds.json``: the ``ray.io/v1`` schemas of KubeRay's CRDs, compacted for offline tests.

    python tests/cluster/crds/make_schemas.py PATH/TO/kuberay v1.7.0 > tests/cluster/crds/kuberay-crds.json

Reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml`` at that git tag of a
KubeRay checkout and keeps each CRD's ``v1`` ``openAPIV3Schema`` without ``status`` (never written by hand) and
without descriptions; sub-schemas that repeat (the pod template appears in every group) are stored once under
``$defs``. The result is the API server's structural schema, checked with ``jsonschema`` in
``tests/cluster/test_manifests.py`` with unknown fields refused (as ``kubectl apply``'s strict field validation
does). What a schema cannot say (CEL ``x-kubernetes-validations``; the operator's own checks in
``ray-operator/controllers/ray/utils/validation.go``) is checked, where it matters here, by ``cluster/manifests.py``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from typing import Any

import yaml

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
MIN_SIZE = 400  # characters of JSON: smaller sub-schemas are cheaper inline than behind a $ref


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def key(node: Any) -> str:
    return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()[:16]


def subschemas(schema: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every schema directly inside ``schema`` (property maps are not schemas themselves)."""
    out: list[tuple[Any, Any]] = [(schema["properties"], name) for name in schema.get("properties", {})]
    for k in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(k), dict):
            out.append((schema, k))
    for k in ("anyOf", "allOf", "oneOf"):
        out += [(schema[k], i) for i in range(len(schema.get(k, [])))]
    return out


def count(schema: dict[str, Any], seen: Counter) -> None:
    if len(json.dumps(schema)) >= MIN_SIZE:
        seen[key(schema)] += 1
    for container, k in subschemas(schema):
        count(container[k], seen)


def factor(schema: dict[str, Any], shared: set[str], defs: dict[str, Any]) -> None:
    """Replace, in place, every shared sub-schema below ``schema`` with a $ref to its one copy in ``defs``."""
    for container, k in subschemas(schema):
        sub = container[k]
        h = key(sub)
        if h in shared:
            if h not in defs:
                defs[h] = sub
                factor(sub, shared, defs)
            container[k] = {"$ref": f"#/$defs/{h}"}
        else:
            factor(sub, shared, defs)


def main(repo: str, tag: str) -> None:
    schemas = {}
    for kind, plural in KINDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True,
                              text=True).stdout
        crd = yaml.safe_load(text)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip(v1["schema"]["openAPIV3Schema"])
        schema["properties"].pop("status", None)
        schemas[kind] = schema
    seen: Counter = Counter()
    for s in schemas.values():
        count(s, seen)
    shared = {k for k, n in seen.items() if n > 1}
    defs: dict[str, Any] = {}
    for s in schemas.values():
        factor(s, shared, defs)
    json.dump({"source": f"ray-project/kuberay {tag}, ray-operator/config/crd/bases (v1, status and descriptions "
                         "removed, repeated sub-schemas under $defs)",
               "kuberay": tag, **schemas, "$defs": defs}, sys.stdout, sort_keys=True, indent=0,
              separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
