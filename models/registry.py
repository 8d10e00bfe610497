"""Models by name, built from plain config data: `build_model({"name": "restormer", "dim": 48})`.

A model's options are its constructor's keyword arguments. Models that take `attention_options`
also accept one sub-dict per attention name (`{"glmha": {"alpha": 0.6}}`), validated against that
attention's options. A model may also take a group of options as one mapping argument (HINT's
`hmha: {...}`); `option_group` merges such a group over its defaults.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from models.attention import ATTENTIONS, attention_options, validate_attention_options

MODELS: dict[str, type[nn.Module]] = {}
_ATTENTION_OPTIONS = "attention_options"


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        MODELS[name] = cls
        return cls

    return register


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _constructor_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {key: p.default for key, p in parameters.items() if key != "self"}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return list(value) if isinstance(value, tuple) else value


def option_group(group: str, given: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a group (a mapping-valued model option) merged over its defaults.

    Unknown keys are an error listing the valid ones, so a sweep cannot silently set nothing.
    """
    if not isinstance(given, Mapping):
        raise ValueError(f"model option {group!r} must be a mapping of {group} options, got {given!r}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(f"{key} (default {_plain(value)!r})" for key, value in defaults.items())
        raise ValueError(f"unknown {group} option(s) {', '.join(unknown)}; valid {group} options: {valid}")
    return {**defaults, **given}


def model_defaults(name: str) -> dict[str, Any]:
    """Every option of a model with its default, as config data (attention options nested by name)."""
    defaults = _constructor_defaults(model_class(name))
    nested = _ATTENTION_OPTIONS in defaults
    defaults.pop(_ATTENTION_OPTIONS, None)
    config = {key: _plain(value) for key, value in defaults.items()}
    if nested:
        config.update({attention: attention_options(attention) for attention in ATTENTIONS})
    return config


def full_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every option the model a config builds runs with: the config over the model's defaults (option
    groups merged key by key); of the attention option groups, only the chosen attention's."""
    defaults = model_defaults(config["name"])
    chosen = config.get("attention", defaults.get("attention"))
    options = {"name": config["name"]}
    for key, value in {**defaults, **config}.items():
        if "attention" in defaults and key in ATTENTIONS and key != chosen:
            continue
        default = defaults.get(key)
        options[key] = {**default, **value} if isinstance(default, Mapping) and isinstance(value, Mapping) else value
    return options


def list_models() -> dict[str, dict[str, Any]]:
    return {name: model_defaults(name) for name in sorted(MODELS)}


def load_model_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A model config from a dict or a YAML file (data only: yaml.safe_load)."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, Mapping):
        raise ValueError(f"model config {path} must be a YAML mapping with a 'name' key")
    return dict(loaded)


def build_model(config: Mapping[str, Any] | str | Path) -> nn.Module:
    """Build a registered model from a config dict or YAML file; unknown names/options are errors."""
    config = load_model_config(config)
    if "name" not in config:
        raise ValueError(f"model config needs a 'name'; registered models: {', '.join(sorted(MODELS))}")
    name = config.pop("name")
    cls = model_class(name)
    valid = _constructor_defaults(cls)
    takes_attention_options = _ATTENTION_OPTIONS in valid
    valid.pop(_ATTENTION_OPTIONS, None)
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, value in config.items():
        if key in valid:
            kwargs[key] = value
        elif takes_attention_options and key in ATTENTIONS:
            if not isinstance(value, Mapping):
                raise ValueError(f"model option {key!r} must be a mapping of {key} options, got {value!r}")
            validate_attention_options(key, dict(value))
            nested[key] = dict(value)
        else:
            unknown.append(key)
    if unknown:
        groups = f"; attention option groups: {', '.join(sorted(ATTENTIONS))}" if takes_attention_options else ""
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; valid options: "
            f"{', '.join(valid)}{groups}"
        )
    if takes_attention_options:
        kwargs[_ATTENTION_OPTIONS] = nested
    return cls(**kwargs)
