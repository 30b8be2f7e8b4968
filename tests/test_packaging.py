"""What ``pip install .`` gives: the wheel carries every file the code reads, and every third-party package the
product imports is declared in pyproject.toml.

A non-editable install (the Dockerfile's ``pip install ".[gpu]"``, or a wheel) has only what package data lists:
a file the code reads through ``configs.CONFIG_DIR`` that is missing from the wheel fails on a cluster, never here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGES = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``PyStemmer`` -> ``pystemmer``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    """The distribution names of requirement strings: ``ray[data]==2.60.0`` -> ``ray``."""
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party modules the product imports (at the top or inside functions) -> files importing them."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for f in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, set()).add(str(f.relative_to(REPO)))
    return found


# Modules of extras that install only on GPU nodes (never here), or only for those who ask (wandb), imported lazily
# inside the code that needs them: module -> the extra that declares its distribution.
LAZY_EXTRAS = {"vllm": "vllm", "wandb": "wandb"}


def test_every_third_party_import_of_the_product_is_a_declared_dependency():
    runtime = declared(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    faiss = declared(extras["cpu"]) | declared(extras["gpu"])  # one of the two is picked at install time
    dists = packages_distributions()
    missing = []
    for module, files in sorted(imported_modules().items()):
        if module in LAZY_EXTRAS:
            extra = LAZY_EXTRAS[module]
            assert module in declared(extras[extra]), f"{module} is not in the {extra} extra"
            continue
        names = {canonical(d) for d in dists.get(module, [])}
        assert names, f"{module} (imported by {sorted(files)}) is not installed here"
        if not names & (runtime | faiss):
            missing.append(f"{module} ({', '.join(sorted(names))}; {', '.join(sorted(files))})")
    assert not missing, f"imported by the product, not in [project] dependencies: {missing}"


def test_every_runtime_dependency_is_pinned():
    loose = [r for r in PYPROJECT["project"]["dependencies"] if "==" not in r]
    assert not loose, f"not pinned to one version: {loose}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of what the Dockerfile copies (pyproject.toml, README.md and the packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp / "dist")], capture_output=True, text=True, cwd=tmp)
    assert run.returncode == 0, run.stderr
    (built,) = (tmp / "dist").glob("ragtune-*.whl")
    return built


def test_the_wheel_carries_every_data_file_of_configs(wheel):
    """Every file under configs/ that is not Python: the YAML configs (the demo's default among them), the
    DeepSpeed presets that jobs/finetune.py reads by name, and the example data a config names."""
    data = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert "configs/demo/default.yaml" in data and "configs/deepspeed/zero2.json" in data
    with zipfile.ZipFile(wheel) as z:
        shipped = set(z.namelist())
    assert [f for f in data if f not in shipped] == []


def test_the_installed_wheel_finds_its_deepspeed_presets(wheel, tmp_path):
    target = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "--no-index", "-q",
                          "--target", str(target)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    code = ("import json, jobs.finetune as f; "
            "print(json.dumps([f.__file__, sorted(p.name for p in f.DEEPSPEED_PRESETS.glob('*.json')), "
            "f.load_preset('zero2')]))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    module, presets, zero2 = json.loads(run.stdout)
    assert Path(module).is_relative_to(target), module
    assert presets == sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json"))
    assert zero2 == json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
