"""Loading, overriding and validating job configs.

A config is a YAML file whose top-level keys are sections (``corpus``, ``chunk``, ``embed``, ...), each a
pydantic model. Command-line overrides are dotted paths into that YAML (``embed.batch_size=128``), parsed as
YAML scalars, so they behave exactly like editing the file. Every problem is collected and reported at once,
each with the field, the value and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from configs.errors import RagtuneError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where, what was given, what is wrong, how to fix it."""

    field: str
    value: Any
    message: str
    fix: str = ""

    def __str__(self) -> str:
        value = "(missing)" if self.value is _MISSING else repr(self.value)
        text = f"{self.field} = {value}: {self.message.rstrip('.')}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class ConfigError(RagtuneError):
    """All problems found in one config, reported together."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConfigError, (self.source, self.problems))


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


_MISSING = _Missing()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning syntax errors and wrong shapes into a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [Problem("(file)", str(path), "no such config file",
                                              "pass the path of a YAML file, e.g. configs/embed/sample.yaml")])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [Problem("(file)", str(path), f"not valid YAML: {e}",
                                              "fix the YAML syntax at the line shown")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [Problem("(file)", type(data).__name__,
                                              "the top level must be a mapping of sections",
                                              "write `section:` keys at the top level")])
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> tuple[dict[str, Any], list[Problem]]:
    """Apply ``a.b.c=value`` overrides to a nested dict (a copy); values are parsed as YAML scalars."""
    out = _deep_copy(data)
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(Problem(item, _MISSING, "an override must look like section.field=value",
                                    "write e.g. embed.batch_size=128"))
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(key, child, f"`{part}` is a value, not a section",
                                        f"override `{part}` itself, e.g. {part}=..."))
                break
            node = child
        else:
            node[parts[-1]] = value
    return out, problems


def validate(cls: type[T], data: Mapping[str, Any], source: str, extra_problems: Sequence[Problem] = ()) -> T:
    """Build ``cls`` from ``data``; raise a ConfigError listing every problem at once."""
    problems = list(extra_problems)
    try:
        obj = cls.model_validate(data)
    except ValidationError as e:
        problems += [_problem_from_pydantic(cls, data, err) for err in e.errors()]
        obj = None
    if problems or obj is None:
        raise ConfigError(source, problems)
    return obj


def load_config(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Read YAML, apply dotted overrides, validate. The one way every job builds its config."""
    data, problems = apply_overrides(read_yaml(path), overrides)
    return validate(cls, data, str(path), problems)


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _lookup(data: Any, loc: Sequence[int | str]) -> Any:
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


def _model_at(cls: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc``, when it can be followed."""
    model: type[BaseModel] | None = cls
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _problem_from_pydantic(cls: type[BaseModel], data: Mapping[str, Any], err: Any) -> Problem:
    # pydantic appends the name of a union member or a validator to loc; drop what is not a data key.
    loc = [p for p in err["loc"] if isinstance(p, int) or not str(p).startswith("function-")]
    field = ".".join(str(p) for p in loc) or "(config)"
    value = _lookup(data, loc)
    msg = err["msg"].removeprefix("Value error, ")
    owner = _model_at(cls, loc)
    fix = ""
    if err["type"] == "extra_forbidden":
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = "unknown field"
        fix = f"did you mean `{close[0]}`?" if close else f"known fields here: {', '.join(known)}"
    elif owner is not None and loc and isinstance(loc[-1], str) and loc[-1] in owner.model_fields:
        info = owner.model_fields[loc[-1]]
        doc = info.description or ""
        if err["type"] == "missing":
            fix = f"add `{field}` ({doc})" if doc else f"add `{field}`"
        elif " Fix: " in msg:
            msg, fix = msg.split(" Fix: ", 1)
        else:
            default = "" if info.is_required() else f"; default {info.default!r}"
            fix = f"{field}: {doc}{default}" if doc else f"see the default{default}"
    elif " Fix: " in msg:
        msg, fix = msg.split(" Fix: ", 1)
    return Problem(field, value, msg, fix)
