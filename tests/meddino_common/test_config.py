"""The one strict config loader (meddino_common.config), on the shipped pretrain and finetune YAMLs."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from meddino_common.config import ConfigError, load_config, load_yaml, parse_overrides, strict_merge

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = CONFIGS / "pretrain" / "base.yaml"
STAGE1 = CONFIGS / "pretrain" / "stage1.yaml"


def test_shipped_stage_merges_and_is_struct():
    cfg = load_config([BASE], [STAGE1], ["optim.lr=1e-3"], open_blocks=["student.overrides"])
    assert cfg.optim.lr == 1e-3
    with pytest.raises(Exception):
        _ = cfg.optim.no_such_key  # struct mode: reading a typo is an error too


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"command line: unknown config key optim.lrr \(did you mean optim.lr\?\)"),
    ("optim.lr=abc", r"optim.lr='abc' is a string, but optim.lr takes a number \(default 0.0002\)"),
    ("compute.compile=3", r"compute.compile=3 is a number, but compute.compile takes a string"),
    ("optim=3", r"optim takes a mapping \(default a block of keys\)"),
    ("lr", r"overrides must look like key=value, got lr"),
])
def test_bad_overrides_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config([BASE], [STAGE1], [override], open_blocks=["student.overrides"])
    assert "\n" not in str(err.value)


def test_open_places_take_anything():
    cfg = load_config([BASE], [STAGE1], ["compute.compile=true",          # auto | true | false
                                         "student.overrides.depth=2",     # open block
                                         "schedules.gram_weight.start=1"],  # null default takes a block
                      open_blocks=["student.overrides"])
    assert cfg.compute.compile is True and cfg.student.overrides.depth == 2


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("train:\n  iteratoins: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key train.iteratoins \(did you mean "
                                          r"train.iterations\?\)"):
        load_config([BASE], [bad])


def test_alternatives_and_empty_mappings():
    defaults = OmegaConf.create({"fold": 0, "labels": {}, "size": 224})
    merged = strict_merge(defaults, ("a", {"fold": "all", "labels": {"liver": 1}, "size": [224, 256]}),
                          alternatives={"fold": ("all",), "size": ("list",)})
    assert merged.fold == "all" and merged.labels.liver == 1
    with pytest.raises(ConfigError, match=r"b: fold='some' is a string"):
        strict_merge(defaults, ("b", {"fold": "some"}), alternatives={"fold": ("all",)})


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not a readable YAML config"):
        load_yaml(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(listing)
    with pytest.raises(ConfigError, match="overrides must look like key=value"):
        parse_overrides(["=3"])
