"""The finetune config is strict: the shipped files define the keys, a typo or a wrong type is a one-line error."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf.errors import ConfigAttributeError

from finetune.config import load_config
from meddino_common.config import ConfigError


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"^command line: unknown config key optim.decoder_lrr \(did you mean optim.decoder_lr\?\)$"):
        load_config("btcv", overrides=["optim.decoder_lrr=1"])
    with pytest.raises(ConfigError, match=r"^command line: unknown config key trian \(did you mean train\?\)$"):
        load_config("btcv", overrides=["trian.epochs=3"])


def test_unknown_key_in_an_extra_file_names_the_file(tmp_path: Path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("infer:\n  mirorr: false\n")
    with pytest.raises(ConfigError, match=rf"^{extra}: unknown config key infer.mirorr \(did you mean infer.mirror\?\)$"):
        load_config("btcv", extra_files=[extra])
    with pytest.raises(ConfigError, match=r"^--config nowhere.yaml: file not found$"):
        load_config("btcv", extra_files=["nowhere.yaml"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"^command line: train.epochs='ten' is a string, but train.epochs takes a "
                                          r"number \(default 1000\)$"):
        load_config("btcv", overrides=["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"^command line: data.patch_size=64 is a number, but data.patch_size takes "
                                          r"a list"):
        load_config("btcv", overrides=["data.patch_size=64"])


def test_valid_overrides_and_open_mappings_still_work():
    cfg = load_config("btcv", extra_files=["tiny.yaml"], overrides=[
        "optim.decoder_lr=1", "preprocess.target_slice_px=null", "model.backbone_overrides.depth=2", "infer.mirror=false"])
    assert cfg.optim.decoder_lr == 1 and cfg.preprocess.target_slice_px is None
    assert cfg.model.backbone_overrides.depth == 2 and cfg.infer.mirror is False
    assert cfg.output_dir == "outputs/finetune/btcv/primus/fold_0"
    with pytest.raises(ConfigAttributeError):   # struct mode: reading an undeclared key is an error, not a default
        cfg.data.slab_depht


def test_fold_all_and_every_shipped_combination_pass(repo_root: Path):
    """``fold=all`` is the one documented union type; every shipped task x head merges strictly, and so do the tiny
    and demo files with the head they are written for (primus: they set ``head.block_indices``)."""
    assert load_config("btcv", overrides=["fold=all"]).fold == "all"
    with pytest.raises(ConfigError, match=r"^command line: fold=\[0, 1\] is a list, but fold takes a number"):
        load_config("btcv", overrides=["fold=[0,1]"])
    configs = repo_root / "configs" / "finetune"
    tasks = [p.stem for p in configs.glob("*.yaml") if p.stem not in ("base", "tiny", "demo", "predict", "paper_table2")]
    for task in tasks:
        for head in (p.stem for p in (configs / "heads").glob("*.yaml")):
            load_config(task, head)
        for extra in ("tiny.yaml", "demo.yaml"):
            load_config(task, "primus", [extra])
    with pytest.raises(ConfigError, match=r"tiny.yaml: unknown config key head.block_indices"):
        load_config("btcv", "mvr", ["tiny.yaml"])  # mvr reads the last blocks, it has no block_indices
