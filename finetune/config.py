"""Finetune configuration: ``base.yaml`` <- ``<task>.yaml`` <- ``heads/<head>.yaml`` <- extra files <- dot-list.

The shipped files (base, task, head) define the keys; extra ``--config`` files and ``key=value`` overrides may only
change them (:func:`strict_merge`): a typo such as ``optim.lrr=1`` is an error naming the nearest valid key, never
a silent run with the default."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from finetune.tasks import resolve_task

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS_DIR = PACKAGE_ROOT / "configs" / "finetune"


def load_config(task: str, head: str = "primus", extra_files: Sequence[str | Path] = (),
                overrides: Sequence[str] = (), configs_dir: Optional[Path] = None) -> DictConfig:
    """The merged, unresolved finetune config (resolution happens when values are read)."""
    configs_dir = Path(configs_dir or DEFAULT_CONFIGS_DIR)
    base = configs_dir / "base.yaml"
    if not base.exists():
        raise FileNotFoundError(f"{base} not found (configs/finetune/ must sit next to the finetune package)")
    head_file = configs_dir / "heads" / f"{head}.yaml"
    if not head_file.exists():
        raise FileNotFoundError(f"no config for head {head!r}: {head_file}")
    defaults = OmegaConf.merge(OmegaConf.load(base), resolve_task(task, configs_dir), OmegaConf.load(head_file))
    parts = []
    for extra in extra_files:
        path = Path(extra)
        if not path.exists() and (configs_dir / path).exists():
            path = configs_dir / path
        elif not path.exists() and (PACKAGE_ROOT / path).exists():  # configs/finetune/x.yaml outside a checkout
            path = PACKAGE_ROOT / path
        if not path.exists():
            raise FileNotFoundError(f"--config {extra}: file not found")
        parts.append((str(path), OmegaConf.load(path)))
    parts.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    cfg = strict_merge(defaults, *parts, other_types={"fold": {"string"}})  # fold: 0..4 or "all"
    if cfg.head.get("name") not in (None, head):
        raise ValueError(f"{head_file} sets head.name={cfg.head.name!r}, expected {head!r}")
    cfg.head.name = head
    return cfg


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


# keys that take a word besides their default's type: fold is 0-4 or "all" (train on every case, as nnU-Net)
ALTERNATIVE_VALUES = {"fold": ("all",)}

_ARTICLE = {"bool": "a bool", "number": "a float", "int": "an int", "list": "a list", "mapping": "a mapping", "string": "a string"}


def _check_types(default: Any, override: Any, origin: str, other_types: dict[str, set[str]], prefix: str = "") -> None:
    if not isinstance(default, dict) or not isinstance(override, dict):
        return
    for key, value in override.items():
        if key not in default:
            continue
        want, got = _kind(default[key]), _kind(value)
        full = f"{prefix}{key}"
        if value in ALTERNATIVE_VALUES.get(full, ()):
            continue
        if want == "mapping" and got == "mapping":
            _check_types(default[key], value, origin, other_types, full + ".")
        elif (want is not None and got is not None and want != got and not (want == "number" and got == "int")
              and got not in other_types.get(full, ())):
            raise ValueError(f"config key {full} ({origin}): expected {_ARTICLE[want]} like the "
                             f"default {default[key]!r}, got {value!r}")
