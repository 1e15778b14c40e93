"""Schedules: warm-up + cosine arrays, DINOv3 lr rule, the stage-1 recipe from the configs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pretrain.train.config import load_config
from pretrain.train.schedules import build_schedules, scaled_lr, warmup_cosine


def test_warmup_cosine_matches_closed_form() -> None:
    s = warmup_cosine(start=0.0, peak=1.0, end=0.1, total_iterations=110, warmup_iterations=10)
    assert s.shape == (110,)
    np.testing.assert_allclose(s[:10], np.arange(10) / 10)
    for i in (10, 35, 60, 109):
        t = i - 10  # 100 cosine steps from peak (t = 0) to end (t = 99), endpoints included
        assert s[i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t / 99)))
    assert s[10] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1)  # the cosine reaches its end value, as DINOv3's linear_warmup_cosine_decay


def test_schedule_matches_dinov3_linear_warmup_cosine_decay() -> None:
    """The official function (dinov3/train/cosine_lr_scheduler.py), re-derived: linspace warm-up without its end
    point, a cosine over linspace(0, pi, n) with both ends, then the constant tail."""
    warm, cos_its, total = 7, 20, 33
    official = np.concatenate([
        np.linspace(0.0, 2.0, warm, endpoint=False),
        (2.0 - 0.5) * (np.cos(np.linspace(0, np.pi, cos_its)) + 1) / 2 + 0.5,
        np.full(total - warm - cos_its, 0.5),
    ])
    np.testing.assert_allclose(warmup_cosine(0.0, 2.0, 0.5, total, warm, cos_its), official, rtol=1e-12)


def test_end_null_keeps_the_peak_after_the_warm_up(repo_root: Path) -> None:
    """Stages 2-3: lr constant after the warm-up, as DINOv3's Gram-anchoring and high-resolution configs."""
    for stage, peak in ((2, 5e-5), (3, 2.5e-5)):
        cfg = load_config(repo_root / f"configs/pretrain/stage{stage}.yaml")
        lr = build_schedules(cfg, 512).lr
        warm = int(round(0.8 * 1250))
        assert lr[0] == 0.0 and lr[warm - 1] < peak
        np.testing.assert_allclose(lr[warm:], peak)


def test_cosine_then_constant_and_truncation() -> None:
    s = warmup_cosine(0.04, 0.07, 0.07, total_iterations=50, warmup_iterations=30, cosine_iterations=0)
    np.testing.assert_allclose(s[:30], 0.04 + 0.03 * np.arange(30) / 30)
    assert np.all(s[30:] == 0.07)
    short = warmup_cosine(0.0, 1.0, 0.0, total_iterations=5, warmup_iterations=100)
    np.testing.assert_allclose(short, np.arange(5) / 100)


def test_dinov3_lr_scaling_rule() -> None:
    assert scaled_lr(2e-4, 512, "none") == 2e-4
    assert scaled_lr(2e-4, 512, "sqrt_wrt_1024") == pytest.approx(2e-4 * 4 * math.sqrt(0.5))
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(1e-4, 512, "linear")


def test_stage1_recipe(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs/pretrain/stage1.yaml")
    s = build_schedules(cfg, global_batch_size=512)
    epoch = int(cfg.train.official_epoch_length)
    assert len(s) == 100_000
    # lr: linear warm-up to the paper's 2e-4, cosine down afterwards
    assert s.lr[0] == 0.0 and s.lr.max() == pytest.approx(2e-4)
    assert s.lr[-1] < 2e-6
    # last layer frozen during the first epoch only
    assert np.all(s.last_layer_lr[:epoch] == 0) and s.last_layer_lr[epoch] == s.lr[epoch] > 0
    # weight decay cosine 0.04 -> 0.2, momentum cosine 0.992 -> 1.0
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.2, abs=1e-6)
    assert np.all(np.diff(s.weight_decay) >= 0)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    # teacher temperature linear 0.04 -> 0.07 over 30 epochs, then 0.07
    n = 30 * epoch
    np.testing.assert_allclose(s.teacher_temp[:n], 0.04 + 0.03 * np.arange(n) / n)
    assert np.all(s.teacher_temp[n:] == 0.07)
    assert s.gram_weight is None
    vals = s.at(10**9)  # clamped to the last iteration
    assert vals["mom"] == pytest.approx(s.momentum[-1])


def test_gram_weight_warmup_schedule(repo_root: Path) -> None:
    cfg = load_config(
        repo_root / "configs/pretrain/stage2.yaml",
        ["schedules.gram_weight={start: 0.0, peak: 2.0, end: 2.0, warmup_epochs: 1, cosine_epochs: 0}"],
    )
    s = build_schedules(cfg, global_batch_size=512)
    epoch = int(cfg.train.official_epoch_length)
    assert s.gram_weight[0] == 0.0 and s.gram_weight[epoch // 2] == pytest.approx(1.0)
    assert np.all(s.gram_weight[epoch:] == 2.0)
    assert s.at(5)["gram_weight"] == pytest.approx(s.gram_weight[5])
