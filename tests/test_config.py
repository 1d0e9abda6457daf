"""The config schema and validator: every profile validates, typos fail loudly with the key named."""

import argparse
from pathlib import Path

import pytest
import yaml

from rapm.cli import main
from rapm.config import ConfigError, deep_merge, load_config, load_schema, parse_override, select_keys, validate

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "config").glob("*.yaml")) + [ROOT / ".test" / "config" / "config.yaml"]


@pytest.fixture
def toy_config():
    return load_config([ROOT / "config" / "config.yaml"])


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_profile_validates(path):
    # Profiles other than the default are layered on top of it, as Snakemake does.
    cfg = load_config([ROOT / "config" / "config.yaml", path])
    assert cfg["profile"] == yaml.safe_load(path.read_text())["profile"]


def _walk(schema, path="<root>"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_schema_is_strict_and_described():
    schema = load_schema()
    for path, node in _walk(schema):
        if path.endswith("[]"):
            continue
        assert node.get("description"), f"{path} has no description"
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False or isinstance(node.get("additionalProperties"), dict), (
                f"{path} must set additionalProperties"
            )


def test_every_schema_key_is_in_the_default_profile_with_a_comment():
    text = (ROOT / "config" / "config.yaml").read_text()
    cfg = yaml.safe_load(text)
    schema = load_schema()

    def keys(node, sub, prefix=""):
        for name, child in sub.get("properties", {}).items():
            if name not in node:
                continue
            yield prefix + name
            if isinstance(node[name], dict) and "properties" in child:
                yield from keys(node[name], child, prefix + name + ".")

    for key in keys(cfg, schema):
        leaf = key.split(".")[-1]
        lines = [line for line in text.splitlines() if line.strip().startswith(leaf + ":")]
        assert lines and all("#" in line for line in lines), f"config.yaml key {key} lacks a comment"


def test_unknown_key_is_named_with_the_file(toy_config):
    bad = deep_merge(toy_config, {"prompts": {"num_tain": 5}})
    with pytest.raises(ConfigError) as err:
        validate(bad, source="my/config.yaml")
    msg = str(err.value)
    assert "my/config.yaml" in msg
    assert "prompts.num_tain: unknown key" in msg
    assert "did you mean 'num_train'" in msg


def test_unknown_top_level_key(toy_config):
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        validate({**toy_config, "trian": {}}, source="x.yaml")


def test_wrong_type_is_named(toy_config):
    bad = deep_merge(toy_config, {"prompts": {"seed": "seven"}})
    with pytest.raises(ConfigError, match=r"prompts\.seed: 'seven' is not of type 'integer'"):
        validate(bad, source="x.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ({"prompts": {"num_eval": 0}}, "prompts.num_eval"),
        ({"data": {"toy": {"image_size": 31}}}, "data.toy.image_size"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"data": {"coco": {"sha256": "abc"}}}, "data.coco.sha256"),
        ({"data": {"coco": {"url": "ftp://x/y.zip"}}}, "data.coco.url"),
    ],
)
def test_bad_values_are_named(toy_config, override, key):
    with pytest.raises(ConfigError) as err:
        validate(deep_merge(toy_config, override), source="x.yaml")
    assert f"  - {key}: " in str(err.value)


def test_all_errors_reported_at_once(toy_config):
    bad = deep_merge(toy_config, {"prompts": {"seed": -1, "num_train": "many"}})
    with pytest.raises(ConfigError) as err:
        validate(bad, source="x.yaml")
    assert "prompts.seed" in str(err.value) and "prompts.num_train" in str(err.value)


def test_source_section_required_only_for_the_chosen_source(toy_config):
    cfg = deep_merge(toy_config, {})
    del cfg["data"]["coco"]
    validate(cfg)  # toy source: the coco section may be absent
    cfg["data"]["source"] = "coco"
    with pytest.raises(ConfigError, match=r"'coco' is a required property"):
        validate(cfg)


def test_defaults_filled(toy_config):
    cfg = deep_merge(toy_config, {})
    del cfg["data"]["coco"]["retries"]
    assert validate(cfg)["data"]["coco"]["retries"] == 5


def test_partial_config_checks_what_is_present():
    assert validate({"prompts": {"seed": 1, "num_train": 2, "num_eval": 3}}, partial=True)
    with pytest.raises(ConfigError, match="prompts.seed"):
        validate({"prompts": {"seed": "x"}}, partial=True)


def test_overrides_and_merge(tmp_path):
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("a.b")
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}}


def test_select_keys(toy_config):
    sub = select_keys(toy_config, ["data.toy", "prompts.seed"])
    assert sub == {"data": {"toy": toy_config["data"]["toy"]}, "prompts": {"seed": 2014}}
    with pytest.raises(ConfigError, match="nope"):
        select_keys(toy_config, ["data.nope"])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("prompts: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config([bad])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])


def test_cli_rejects_bad_config_before_work(tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["prompts"]["num_evla"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    rc = main(["prompts", "--config", str(path), "--captions-dir", str(tmp_path), "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "typo.yaml" in err and "prompts.num_evla: unknown key" in err
    assert not out.exists()


def test_cli_rejects_abbreviated_options(capsys):
    with pytest.raises(SystemExit):
        main(["validate-config", str(ROOT / "config" / "config.yaml"), "--par"])


def test_readme_config_table_is_current(capsys):
    """docs/configuration.md's table is generated from the schema; `rapm docs --write` refreshes it."""
    assert main(["docs", "--check", "--file", str(ROOT / "docs" / "configuration.md")]) == 0, capsys.readouterr().err


def test_docs_check_detects_a_stale_table(tmp_path):
    stale = tmp_path / "configuration.md"
    text = (ROOT / "docs" / "configuration.md").read_text()
    stale.write_text(text.replace("| `prompts.seed` |", "| `prompts.sead` |"))
    assert main(["docs", "--check", "--file", str(stale)]) == 1
    assert main(["docs", "--write", "--file", str(stale)]) == 0
    assert stale.read_text() == text


def test_exponent_floats_read_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; rapm's loader and the validator read it as a float."""
    from rapm.config import parse_override

    assert parse_override("train.optim.student_lr=1e-3") == {"train": {"optim": {"student_lr": 0.001}}}
    cfg = validate({"train": {"optim": {"student_lr": "2e-4"}}, "profile": "x"}, partial=True)
    assert cfg["train"]["optim"]["student_lr"] == 2e-4
    assert validate({"profile": "1e5"}, partial=True)["profile"] == "1e5"  # a string key stays a string


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1e999", ".NaN"])
def test_non_finite_numbers_are_refused_naming_the_key(text, capsys):
    """JSON Schema lets NaN pass every bound (``nan < 0`` is false): the validator refuses NaN/±inf itself."""
    cfg = ROOT / "config" / "config.yaml"
    with pytest.raises(ConfigError) as err:
        load_config([cfg], [f"train.optim.student_lr={text}"])
    assert "  - train.optim.student_lr: " in str(err.value) and "not a finite number" in str(err.value)
    assert str(err.value).count("  - train.optim.student_lr") == 1  # once, not also as a schema bound
    assert main(["validate-config", str(cfg), "--set", f"train.optim.student_lr={text}"]) == 2
    assert "train.optim.student_lr" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"  - variants\.rank4\.train\.lora\.alpha: .*not a finite number"):
        load_config([cfg], [f"variants.rank4.train.lora.alpha={text}"])
    with pytest.raises(ConfigError, match=r"  - train\.optim\.student_betas\.1: .*not a finite number"):
        validate({"train": {"optim": {"student_betas": [0.9, float(text.replace(".", "", 1))]}}}, partial=True)


def test_unknown_run_variant_is_refused_by_validate_config(toy_config, capsys):
    from rapm.config import check_run_variants

    cfg = ROOT / "config" / "config.yaml"
    assert main(["validate-config", str(cfg), "--set", "run_variants=[rapm, nope]"]) == 2
    assert "run_variants: names ['nope'], which are not in variants" in capsys.readouterr().err
    assert main(["validate-config", str(cfg), "--set", "run_variants=[rapm, rank4]"]) == 0
    bad = deep_merge(toy_config, {"run_variants": ["rapm", "nope"]})
    with pytest.raises(ConfigError, match=r"^run_variants names \['nope'\], which are not in variants \(\["):
        check_run_variants(bad)
    check_run_variants(toy_config)


def test_command_line_strings_are_read_by_the_schema_types():
    from rapm.config import apply_command_line

    cfg = load_config(["config/config.yaml"])
    line = {
        "train": {"iterations": "100", "optim": {"student_lr": "1e-4"}, "snapshot_every": "null"},
        "evaluation": {"clip": {"prefix": "1"}},
        "run_variants": "[rapm, n1]",
        "sampling": {"shards": "two"},
    }
    out = apply_command_line(cfg, line)
    assert out["train"]["iterations"] == 100 and out["train"]["optim"]["student_lr"] == 1e-4
    assert out["train"]["snapshot_every"] is None and out["run_variants"] == ["rapm", "n1"]
    assert out["evaluation"]["clip"]["prefix"] == "1"  # a string key keeps the string
    assert out["sampling"]["shards"] == "two"  # not an integer: left for the validator to name
    assert out["train"]["optim"]["disc_lr"] == cfg["train"]["optim"]["disc_lr"]


def test_set_errors_name_the_set_override(capsys):
    assert main(["validate-config", "config/config.yaml", "--set", "train.iterations=x"]) != 0
    err = capsys.readouterr().err
    assert "--set train.iterations=x" in err and "train.iterations: 'x' is not of type 'integer'" in err


def test_version_and_help_without_rst_markup():
    import subprocess
    import sys

    from rapm import __version__

    out = subprocess.run([sys.executable, "-m", "rapm", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"rapm {__version__}"
    help_text = subprocess.run(
        [sys.executable, "-m", "rapm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "``" not in help_text and "python -m rapm <stage>" in help_text


def test_no_description_is_cut_by_an_unquoted_hash():
    """In a plain YAML scalar `` #`` starts a comment: "without detach #2 (...)" would load as "without detach"."""
    import re

    for path in [ROOT / "config" / "config.yaml", ROOT / "workflow" / "schemas" / "config.schema.yaml"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            m = re.match(r"^\s*description: (?![\"'])(.*)$", line)
            if m:
                value = m.group(1).split("  # ")[0]  # a trailing comment (two spaces, then #) is fine
                assert " #" not in value, f"{path.name}:{n}: quote this description: {line.strip()}"


def test_section_defaults_are_the_schemas_and_what_validation_fills():
    from rapm.config import section_defaults
    from rapm.lora import PCM_TARGETS

    assert section_defaults("teacher")["path"] == "rapm:tinysd"
    assert PCM_TARGETS[:4] == ("to_q", "to_k", "to_v", "to_out.0") and len(PCM_TARGETS) == 14
    filled = validate({"profile": "x", "train": {"lora": {}, "discriminator": {}}}, partial=True)["train"]
    assert filled["lora"] == section_defaults("train.lora")
    assert filled["discriminator"] == section_defaults("train.discriminator")
    a = section_defaults("train.lora")
    a["targets"].append("x")
    assert "x" not in section_defaults("train.lora")["targets"]  # a fresh copy each time


def test_cli_registry_builds_every_command_and_finds_the_one_asked():
    """Every registered command's module has its ``arguments`` / ``command`` pair (all built at once),
    and the command a command line names is found past the global options."""
    from rapm.cli import COMMANDS, build_parser, requested

    parser = build_parser("*")
    for name in COMMANDS:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        words = name.split(" ")
        sub = action.choices[words[0]]
        if len(words) == 2:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[words[1]]
        assert callable(sub.get_default("func")), name
    assert requested(["--log", "train", "-v", "toy", "train-clip", "--config", "x"]) == "toy train-clip"
    assert requested(["train", "--config", "x"]) == "train"
    assert requested(["toy"]) is None and requested(["bogus"]) is None and requested([]) is None
