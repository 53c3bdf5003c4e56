"""The config file is validated on load: types and ranges, with errors that name the path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from junction.shared.config import (
    DTYPES,
    ConfigError,
    JunctionConfig,
    check_config,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"limits": {"max_tokens": "many"}}, "limits.max_tokens: must be an integer"),
        ({"limits": {"max_tokens": "4"}}, "limits.max_tokens: must be an integer"),
        ({"limits": {"max_n": 2.5}}, "limits.max_n: must be an integer"),
        ({"limits": {"max_n": True}}, "limits.max_n: must be an integer"),
        ({"limits": {"max_concurrency": -3}}, "limits.max_concurrency: must be >= 1"),
        ({"limits": {"max_prompt_tokens": 0}}, "limits.max_prompt_tokens: must be >= 1"),
        ({"base": {"device": "tpu"}}, "base.device: must be auto, cpu, cuda, cuda:N or mps"),
        ({"guidance": {"device": "cuda:x"}}, "guidance.device: must be auto, cpu, cuda"),
        ({"value": {"dtype": "int8"}}, "value.dtype: must be one of float32, bfloat16 or float16"),
        ({"value": {"num_gpus": "1"}}, "value.num_gpus: must be a number"),
        ({"base": {"num_gpus": -1}}, "base.num_gpus: must be >= 0"),
        ({"base": {"num_cpus": float("inf")}}, "base.num_cpus: must be a finite number"),
        ({"base": {"num_cpus": float("nan")}}, "base.num_cpus: must be a finite number"),
        ({"guidance": {"threads": -1}}, "guidance.threads: must be >= 0"),
        ({"base": {"source": ""}}, "base.source: must be a non-empty string"),
        ({"base": {"source": 7}}, "base.source: must be a string"),
        ({"base": {"sorce": "default"}}, "base.sorce: unknown field (known: source, device,"),
        ({"models": {}}, "models: unknown field (known: base, guidance, value, limits"),
        ({"limits": [1, 2]}, "limits: must be a mapping"),
        ({"base": "gpt2"}, "base: must be a mapping"),
    ],
)
def test_bad_values_are_refused_naming_the_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_every_bad_field_is_named_in_one_line() -> None:
    bad = {"limits": {"max_concurrency": -3, "max_tokens": "many"}, "base": {"device": "tpu"}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(bad)
    text = str(info.value)
    for path in ("limits.max_concurrency", "limits.max_tokens", "base.device"):
        assert path in text


@pytest.mark.parametrize(
    ("data", "check"),
    [
        ({}, lambda c: c == JunctionConfig()),
        ({"value": None}, lambda c: c.value is None),  # no value model
        ({"limits": None, "base": None}, lambda c: c == JunctionConfig()),  # empty sections
        ({"base": {"device": "cuda:1", "num_gpus": 1}}, lambda c: c.base.num_gpus == 1.0),
        ({"guidance": {"device": "mps", "dtype": "bfloat16"}}, lambda c: c.guidance.dtype != ""),
        ({"base": {"source": "org/model", "num_cpus": 0.5}}, lambda c: c.base.num_cpus == 0.5),
        ({"limits": {"max_concurrency": 1}}, lambda c: c.limits.max_concurrency == 1),
    ],
)
def test_good_values_load(data: dict, check) -> None:
    assert check(config_from_dict(data))


def test_dtypes_are_the_loaders() -> None:
    from junction.shared.models import DTYPES as LOADER_DTYPES

    assert tuple(LOADER_DTYPES) == DTYPES


def sections() -> list[tuple[str, type]]:
    """Every section of the config file and its dataclass (whatever sections exist now)."""
    out = []
    for f in dataclasses.fields(JunctionConfig):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if dataclasses.is_dataclass(default):
            out.append((f.name, type(default)))
    return out


def test_every_field_of_every_section_is_type_checked() -> None:
    """Validation is generic: a section added to JunctionConfig is checked by its field types
    with no other change, so a mapping where a value belongs fails for every field."""
    assert {"base", "guidance", "value", "limits"} <= {name for name, _ in sections()}
    for name, cls in sections():
        for f in dataclasses.fields(cls):
            with pytest.raises(ConfigError, match=rf"^{name}\.{f.name}: "):
                config_from_dict({name: {f.name: {"not": "a value"}}})


def test_a_config_changed_in_code_is_checked_the_same_way() -> None:
    config = JunctionConfig()
    config.base.device = "tpu"  # as a command line's --device would
    with pytest.raises(ConfigError, match="base.device"):
        check_config(config)
    assert check_config(JunctionConfig()) == JunctionConfig()


@pytest.mark.parametrize("path", [ROOT / "deploy/junction.yaml", ROOT / "k8s/junction.yaml"])
def test_the_shipped_configs_load(path: Path) -> None:
    assert load_config(str(path)).value is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: [\n", "not valid YAML (line 2)"),
        ("- base\n- guidance\n", "config: must be a mapping of sections"),
        ("limits: {max_tokens: many}\n", "limits.max_tokens: must be an integer"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "junction.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "nope.yaml"))
    assert load_config(None) == JunctionConfig()
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(str(tmp_path / "empty.yaml")) == JunctionConfig()
