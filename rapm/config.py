"""Configuration: load YAML files, merge them, validate against the JSON schema.

The schema (``rapm/schemas/config.schema.yaml``, also reachable as
``workflow/schemas/config.schema.yaml``) is the single description of every key. It is
applied when the workflow starts (``Snakefile``) and when any CLI stage starts, so a typo
fails before any job runs, with a message that names the key and the file.

Beyond the schema, :func:`validate` refuses NaN and ±inf for every number (JSON Schema lets NaN
pass every bound; YAML reads ``.nan``/``.inf``), and a ``run_variants`` entry that is not in
``variants`` (:func:`check_run_variants`, the check the workflow shares).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from rapm.errors import RapmError

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


class ConfigError(RapmError, ValueError):
    """A configuration file is missing, malformed or does not satisfy the schema."""

    exit_code = 2


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def section_defaults(dotted: str) -> dict:
    """The schema's defaults of one config section (``teacher``, ``train.lora``, ...), a fresh copy: the
    one source of every default (the section's own ``default`` object, then each key's ``default``)."""
    node = load_schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    out = copy.deepcopy(node.get("default", {}))
    for key, sub in node.get("properties", {}).items():
        if "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    return out


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float (YAML 1.2), not the string PyYAML's YAML 1.1 makes of it."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    """Read one YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# Replicate r >= 1 of variant V (trained with train.seed + r) is named V-seed<r>; the schema refuses
# variant names of that form.
REPLICATE = re.compile(r"^(?P<variant>.+)-seed(?P<r>[1-9][0-9]*)$")


def replicate_name(variant: str, r: int) -> str:
    """The name of replicate ``r`` of ``variant``: the variant itself for r = 0, else ``<variant>-seed<r>``."""
    return variant if r == 0 else f"{variant}-seed{r}"


def split_replicate(name: str) -> tuple[str, int]:
    """``(variant, r)`` of a replicate name (``rapm`` -> ``("rapm", 0)``, ``rapm-seed2`` -> ``("rapm", 2)``)."""
    m = REPLICATE.match(name)
    return (m["variant"], int(m["r"])) if m else (name, 0)


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """Return ``base`` with ``override`` merged in; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` (value in YAML) into ``{"a": {"b": {"c": value}}}``."""
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (dotted key), got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: malformed key {key!r} in {text!r}")
    value: Any = load_yaml(raw) if raw else None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _key(path: Iterable) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _schema_at(schema: dict, path: Iterable) -> dict:
    """The sub-schema describing the object at ``path`` (object keys only)."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif "items" in node:
            node = node["items"]
        else:
            return {}
    return node


def _describe(error, schema: dict) -> list[str]:
    """One line per offending key, naming it with its dotted path."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(_schema_at(schema, path).get("properties", {}))
        lines = []
        for extra in sorted(set(error.instance) - set(allowed)):
            hint = difflib.get_close_matches(extra, allowed, n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
            lines.append(f"{_key(path + [extra])}: unknown key{tip}")
        return lines
    if error.validator == "required":
        return [f"{_key(path)}: {error.message}"]
    return [f"{_key(path)}: {error.message}"]


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Insert schema ``default`` values for keys absent from ``instance`` (in place)."""
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _fill_defaults(instance[name], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name, value in instance.items():
            if name not in schema.get("properties", {}):
                _fill_defaults(value, extra)


_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _coerce_floats(instance: Any, schema: dict) -> Any:
    """``"1e-3"`` -> 0.001 where the schema asks for a number: Snakemake reads config files with YAML 1.1,
    which leaves such floats as strings (``rapm`` itself reads YAML 1.2 floats, :class:`YamlLoader`)."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    if isinstance(instance, str) and "number" in types and _FLOAT_1_2.match(instance):
        return float(instance)
    if isinstance(instance, dict):
        extra = schema.get("additionalProperties")
        for name, value in instance.items():
            sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else {})
            instance[name] = _coerce_floats(value, sub)
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [_coerce_floats(v, schema["items"]) for v in instance]
    return instance


def _coerce_string(text: str, schema: dict) -> Any:
    """``text`` read as YAML when the schema does not take a string there and the YAML value has a type it
    takes (``"100"`` -> 100 for an integer key); else ``text`` unchanged, for the validator to report."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    if not types or "string" in types:
        return text
    try:
        value = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError:
        return text
    import jsonschema

    checker = jsonschema.Draft202012Validator.TYPE_CHECKER
    if not any(checker.is_type(value, t) for t in types):
        return text
    return coerce_strings(value, schema) if isinstance(value, (dict, list)) else value


def coerce_strings(instance: Any, schema: dict) -> Any:
    """Every string where the schema asks for another type, read as YAML (:func:`_coerce_string`). Snakemake
    passes each value of ``--config 'train={iterations: 100}'`` as a string; the CLI's ``--set`` already
    reads YAML. Strings where the schema takes a string stay strings."""
    if isinstance(instance, str):
        return _coerce_string(instance, schema)
    if isinstance(instance, dict):
        extra = schema.get("additionalProperties")
        return {
            name: coerce_strings(
                value, schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else {})
            )
            for name, value in instance.items()
        }
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [coerce_strings(v, schema["items"]) for v in instance]
    return instance


def apply_command_line(config: Mapping, command_line: Mapping) -> dict:
    """``config`` (config files merged with Snakemake's ``--config`` values) with the command-line values
    read by the schema's types (:func:`coerce_strings`) and merged again, so a nested ``--config`` value
    gets the type its key asks for. Values from the config files are left as they are."""
    return deep_merge(config, coerce_strings(copy.deepcopy(dict(command_line)), load_schema()))


def _non_finite_numbers(node: Any, path: list) -> dict[str, str]:
    """{dotted key: message} for every NaN or ±inf number in ``node`` (any depth, list items too)."""
    if isinstance(node, float) and not math.isfinite(node):
        return {_key(path): f"{_key(path)}: {node!r} is not a finite number (NaN and ±inf are refused)"}
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for name, value in node.items():
            out.update(_non_finite_numbers(value, [*path, name]))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.update(_non_finite_numbers(value, [*path, i]))
    return out


def run_variants_problem(config: Mapping) -> str | None:
    """What is wrong with ``run_variants`` (names that are not in ``variants``), or None; None too when
    either key is absent (a partial config) or malformed (the schema reports that)."""
    names, variants = config.get("run_variants"), config.get("variants")
    if not isinstance(names, list) or not isinstance(variants, Mapping):
        return None
    unknown = [n for n in names if isinstance(n, str) and n not in variants]
    if unknown:
        return f"names {unknown}, which are not in variants ({sorted(variants)})"
    return None


def check_run_variants(config: Mapping) -> None:
    """Raise :class:`ConfigError` when ``run_variants`` names a variant that ``variants`` does not define
    (the message: ``run_variants names [...], which are not in variants ([...])``)."""
    problem = run_variants_problem(config)
    if problem:
        raise ConfigError(f"run_variants {problem}")


def validate(config: Mapping, source: str = "<config>", partial: bool = False) -> dict:
    """Validate ``config`` and return a copy with schema defaults filled in.

    ``source`` names the file(s) the values came from, for the error message.
    ``partial=True`` accepts a config that holds only some keys (the per-stage config files the
    workflow writes); every key present is still checked in full, and a stage states the keys
    it needs with :func:`require`.
    """
    import jsonschema

    schema = load_schema()
    instance = json.loads(json.dumps(config))  # plain types only; also a deep copy
    _fill_defaults(instance, schema)
    _coerce_floats(instance, schema)
    validator = jsonschema.Draft202012Validator(schema)
    non_finite = _non_finite_numbers(instance, [])
    lines: list[str] = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        if partial and error.validator == "required":
            continue
        if _key(error.absolute_path) in non_finite:  # reported once, below, as not finite
            continue
        lines.extend(_describe(error, schema))
    lines.extend(non_finite.values())
    problem = run_variants_problem(instance)
    if problem:
        lines.append(f"run_variants: {problem}")
    if lines:
        body = "\n".join(f"  - {line}" for line in lines)
        raise ConfigError(f"{source}: invalid configuration\n{body}")
    return instance


def load_config(paths: Iterable[str | Path], overrides: Iterable[str] = (), partial: bool = False) -> dict:
    """Read, merge (later files win), apply ``--set`` overrides and validate."""
    paths, overrides = [Path(p) for p in paths], list(overrides)
    if not paths:
        raise ConfigError("no config file given")
    merged: dict = {}
    for path in paths:
        merged = deep_merge(merged, read_yaml(path))
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    source = ", ".join([str(p) for p in paths] + ([f"--set {' '.join(overrides)}"] if overrides else []))
    return validate(merged, source=source, partial=partial)


def lookup(config: Mapping, dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key (``"train.optim.student_lr"``) in a nested mapping."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def require(config: Mapping, *keys: str, source: str = "<config>") -> None:
    """Fail clearly when a stage is given a config without the (dotted) keys it needs."""
    missing = [k for k in keys if not lookup(config, k)[0]]
    if missing:
        raise ConfigError(f"{source}: this stage needs the key(s) {', '.join(missing)}")


def select_keys(config: Mapping, keys: Iterable[str]) -> dict:
    """The sub-config holding only the given dotted keys (nested as in the full config)."""
    out: dict = {}
    for dotted in keys:
        found, value = lookup(config, dotted)
        if not found:
            raise ConfigError(f"config has no key {dotted!r}")
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = copy.deepcopy(value)
    return out


def write_yaml(data: Mapping, path: str | Path) -> None:
    """Write ``data`` as YAML atomically (temp file, then rename); keys keep their order."""
    from rapm.io import write_text

    write_text(path, yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))


# --- command line (registered in rapm.cli) --------------------------------------------------


def arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``rapm validate-config`` (registered in :mod:`rapm.cli`)."""
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--partial", action="store_true", help="accept a config with only some sections")


def command(args: argparse.Namespace) -> int:
    cfg = load_config(args.files, args.overrides, partial=args.partial)
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))
    return 0
