"""pretrain.models.input_mapping: the HU -> input mapping of a checkpoint is its run's data.transform."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from meddino_common.config import ConfigError
from pretrain.models.input_mapping import load_hu_transform, run_config_of


def _run_folder(tmp_path: Path, repo_root: Path, mean: float) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml")
    cfg.data.transform.mean = mean
    OmegaConf.save(cfg, run / "config.yaml")
    return run


def test_run_config_next_to_or_one_folder_above_the_checkpoint(tmp_path: Path, repo_root: Path) -> None:
    run = _run_folder(tmp_path, repo_root, mean=0.0)
    assert run_config_of(run / "teacher_backbone.pth") == run / "config.yaml"
    assert run_config_of(run / "checkpoints" / "model_0000100.pth") == run / "config.yaml"
    assert run_config_of(run) == run / "config.yaml"  # a folder checkpoint (HF export) names itself
    # a config.yaml that is not a pretrain config (an HF folder's, a finetune run's) is not the run's
    (run / "checkpoints" / "config.yaml").write_text("model_type: dinov3_vit\n")
    assert run_config_of(run / "checkpoints" / "model_0000100.pth") == run / "config.yaml"
    assert run_config_of(tmp_path / "elsewhere" / "x.pth") is None


def test_load_hu_transform_reads_the_block_or_says_which_file(tmp_path: Path, repo_root: Path) -> None:
    run = _run_folder(tmp_path, repo_root, mean=100.0)
    transform = load_hu_transform(run / "config.yaml")
    assert transform.mean == 100.0 and transform.out_channels == 3
    x = transform(torch.tensor([[100.0]]))
    torch.testing.assert_close(x, torch.zeros_like(x))
    (tmp_path / "other.yaml").write_text("optim: {lr: 1}\n")
    with pytest.raises(ConfigError, match="other.yaml: no data.transform"):
        load_hu_transform(tmp_path / "other.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_hu_transform(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("data: {transform: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_hu_transform(tmp_path / "broken.yaml")
