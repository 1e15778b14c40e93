"""Strict config merging for the curation CLI: the shipped ``configs/data/ct3m.yaml`` defines the keys; a ``--config``
copy and ``key=value`` overrides may only change them. A typo is an error naming the nearest valid key, a value of
another type an error naming the key.

The same rules as ``finetune/config.py``'s ``strict_merge``: curation may not import finetune and the two packages
share only ``meddino_datasets/`` (dataset knowledge, not config code), so the helper exists twice until the configs get a
common home (issue #19)."""
from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError


def strict_merge(defaults: DictConfig, *overrides: tuple[str, Any], other_types: dict[str, set[str]] | None = None) -> DictConfig:
    """``defaults`` <- each ``(origin, config)`` of ``overrides``, refusing what the defaults do not define.

    An unknown key is a ``ValueError`` naming the key, where it came from and the nearest valid key (difflib); a value
    whose type differs from the default's (a string for a number, a list for a scalar...) is one too. Mappings that
    are empty in the defaults (``task.labels: {}``, ``model.backbone_overrides: {}``) are open: any key goes there.
    Null defaults and ``???`` accept any value; an int is accepted where the default is a float; ``other_types``
    names keys that also take another type (``{"fold": {"string"}}``: 0..4 or "all"). The result is not in struct
    mode, so code may still add derived keys (``task.class_names``)."""
    merged = OmegaConf.create(OmegaConf.to_container(defaults, resolve=False))
    _close(merged)
    for origin, override in overrides:
        try:
            merged = OmegaConf.merge(merged, override)
        except ConfigKeyError as err:
            raise ValueError(_unknown_key_message(str(err.full_key), origin, defaults)) from None
        _check_types(OmegaConf.to_container(defaults, resolve=False), OmegaConf.to_container(override, resolve=False), origin,
                     other_types or {})
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=False))  # struct flags dropped


def _close(node: DictConfig) -> None:
    """Struct mode on every non-empty mapping (empty ones stay open for user-named keys)."""
    OmegaConf.set_struct(node, len(node) > 0)
    for value in node.values() if len(node) else ():
        if isinstance(value, DictConfig):
            _close(value)


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    keys = []
    for key, value in tree.items():
        full = f"{prefix}{key}"
        keys += [full, *_dotted_keys(value, full + ".")]
    return keys


def _unknown_key_message(key: str, origin: str, defaults: DictConfig) -> str:
    known = _dotted_keys(OmegaConf.to_container(defaults, resolve=False))
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [k for k in known if k.startswith(parent) and "." not in k[len(parent):]]
    nearest = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {nearest[0]}?" if nearest else f"; valid keys here: {', '.join(siblings[:12]) or '(none)'}"
    return f"unknown config key {key} ({origin}){hint}"


def _kind(value: Any) -> str | None:
    """Type family of a config value; None when anything may replace it (null, ???, ${interpolation})."""
    if value is None or (isinstance(value, str) and (value == "???" or "${" in value)):
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if isinstance(value, float) else "int"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "string"


_ARTICLE = {"bool": "a bool", "number": "a float", "int": "an int", "list": "a list", "mapping": "a mapping", "string": "a string"}


def _check_types(default: Any, override: Any, origin: str, other_types: dict[str, set[str]], prefix: str = "") -> None:
    if not isinstance(default, dict) or not isinstance(override, dict):
        return
    for key, value in override.items():
        if key not in default:
            continue
        want, got = _kind(default[key]), _kind(value)
        full = f"{prefix}{key}"
        if want == "mapping" and got == "mapping":
            _check_types(default[key], value, origin, other_types, full + ".")
        elif (want is not None and got is not None and want != got and not (want == "number" and got == "int")
              and got not in other_types.get(full, ())):
            raise ValueError(f"config key {full} ({origin}): expected {_ARTICLE[want]} like the "
                             f"default {default[key]!r}, got {value!r}")
