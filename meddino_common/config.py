"""The one config loader: defaults file(s) + experiment file(s) + command-line dot-list, merged strictly.

Every package reads its YAML through :func:`load_config`. The *defaults* (``configs/pretrain/base.yaml``;
``configs/finetune/base.yaml`` + task + head; ``configs/data/ct3m.yaml``...) declare every key. The *layers* (a
stage file, a user's ``--config`` copy) and the ``key=value`` *overrides* may only change declared keys:

- a key the defaults do not declare is a :class:`ConfigError` naming the key, where it came from and the nearest
  valid key (``optim.lrr`` -> ``did you mean optim.lr?``);
- a value whose type contradicts the default's is one too (``optim.lr=abc``). Ints and floats are one family
  (schedules count fractional epochs where the default is a whole number). A default of ``auto`` also takes a bool (tri-state
  switches such as ``compute.compile``);
- open places take anything: a default that is null, ``???`` or an ``${interpolation}``, an empty mapping
  (``task.labels: {}``), and the dotted keys listed in ``open_blocks``; ``alternatives`` names keys that also take
  another type family or literal value (``{"fold": ("all",)}``, ``{"crops.global_crops_size": ("list",)}``).

The merged result is in struct mode, so reading a key that does not exist is an error too (add derived keys
under ``omegaconf.open_dict``). Interpolations stay unresolved until a value is read.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError", "load_config", "load_yaml", "parse_overrides", "shipped_config", "strict_merge"]

# the shipped YAMLs: configs/ beside the packages, in a checkout and in site-packages alike (pyproject installs it)
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_config(*parts: str) -> Path:
    """A path under the shipped ``configs/`` folder: ``shipped_config("pretrain", "base.yaml")``."""
    return SHIPPED_CONFIGS.joinpath(*parts)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line naming the key or file."""


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML mapping from ``path``, or a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{path}: not a readable YAML config: {first}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(cfg).__name__}")
    return cfg


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``["optim.lr=1e-4", "fold=all"]`` -> a config; a malformed item is a one-line :class:`ConfigError`."""
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {' '.join(bad)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)}: {str(err).splitlines()[0]}") from err


def load_config(defaults: Sequence[str | Path | DictConfig], layers: Sequence[str | Path] = (),
                overrides: Sequence[str] = (), *, open_blocks: Sequence[str] = (),
                alternatives: Mapping[str, Sequence[Any]] | None = None) -> DictConfig:
    """Merge the ``defaults`` (files or configs, in order; together they declare the keys), then each file of
    ``layers``, then ``overrides``, checking every layer and the overrides against the defaults (module doc)."""
    declared = OmegaConf.merge(*[d if isinstance(d, DictConfig) else load_yaml(d) for d in defaults]) \
        if defaults else OmegaConf.create({})
    given = [(str(p), load_yaml(p)) for p in layers]
    if overrides:
        given.append(("command line", parse_overrides(overrides)))
    return strict_merge(declared, *given, open_blocks=open_blocks, alternatives=alternatives)


def strict_merge(defaults: DictConfig, *layers: tuple[str, DictConfig | Mapping], open_blocks: Sequence[str] = (),
                 alternatives: Mapping[str, Sequence[Any]] | None = None) -> DictConfig:
    """``defaults`` <- each ``(origin, config)`` of ``layers``, refusing what the defaults do not declare."""
    known = OmegaConf.to_container(defaults, resolve=False)
    merged = defaults
    for origin, layer in layers:
        layer_cfg = layer if isinstance(layer, DictConfig) else OmegaConf.create(dict(layer))
        _check(known, OmegaConf.to_container(layer_cfg, resolve=False), origin, tuple(open_blocks),
               dict(alternatives or {}), known, "")
        merged = OmegaConf.merge(merged, layer_cfg)
    merged = OmegaConf.create(OmegaConf.to_container(merged, resolve=False))
    OmegaConf.set_struct(merged, True)
    return merged


def _kind(value: Any) -> str | None:
    """Type family of a config value; None when anything may replace it (null, ???, ${interpolation})."""
    if value is None or (isinstance(value, str) and (value == "???" or "${" in value)):
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "string"


_ARTICLE = {"bool": "a bool", "number": "a number", "list": "a list", "mapping": "a mapping", "string": "a string"}


def _check(default: dict, layer: dict, origin: str, open_blocks: tuple[str, ...], alternatives: dict,
           root: dict, prefix: str) -> None:
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if full in open_blocks:
            continue
        if key not in default:
            raise ConfigError(_unknown_key_message(full, origin, root))
        want, got = _kind(default[key]), _kind(value)
        if want == "mapping" and not default[key]:
            continue  # an empty mapping is open: user-named keys (task.labels)
        if want == "mapping" and got == "mapping":
            _check(default[key], value, origin, open_blocks, alternatives, root, full + ".")
            continue
        allowed = alternatives.get(full, ())
        if want is None or got is None or value in allowed or got in allowed:
            continue
        if want == got:
            continue
        if want == "string" and default[key] == "auto" and got == "bool":
            continue  # tri-state switches: auto | true | false
        shown = "a block of keys" if want == "mapping" else repr(default[key])
        raise ConfigError(f"{origin}: {full}={value!r} is {_ARTICLE[got]}, but {full} takes "
                          f"{_ARTICLE[want]} (default {shown})")


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    keys = []
    for key, value in tree.items():
        keys += [f"{prefix}{key}", *_dotted_keys(value, f"{prefix}{key}.")]
    return keys


def _unknown_key_message(key: str, origin: str, root: dict) -> str:
    known = _dotted_keys(root)
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
    nearest = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.5)
               or difflib.get_close_matches(key, known, n=1, cutoff=0.6))
    hint = f" (did you mean {nearest[0]}?)" if nearest else f" (valid keys here: {', '.join(siblings[:12]) or 'none'})"
    return f"{origin}: unknown config key {key}{hint}"
