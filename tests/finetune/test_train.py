"""The common training loop on real CT: an interrupted run resumed from its checkpoint ends with exactly the weights
of an uninterrupted run (CPU), frozen encoders stay unchanged, and the loss goes down on a fixed batch stream."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import load_config
from finetune.heads import HeadRecipe, get_recipe
from finetune.preprocess import Plans, preprocess_dataset
from finetune.train import fit
from meddino_datasets.case import Case


PLANS = Plans(target_spacing_yx=[2.0, 2.0], clip_low=-100, clip_high=250, mean=90, std=40,
              labels=["background", "spleen"], patch_size=[32, 32])


@pytest.fixture(scope="module")
def spleen_dirs(real_data, tmp_path_factory):
    d = real_data / "ivadomed_msd_spleen"
    case = Case("spleen2", d / "sub-spleen2_ct.nii.gz", d / "sub-spleen2_ct_seg-manual.nii.gz")
    return list(preprocess_dataset([case], PLANS, tmp_path_factory.mktemp("cache")).values())


def _cfg(tmp_path: Path, **over):
    (tmp_path / "Dataset7_Spleen").mkdir(exist_ok=True)
    cfg = load_config(str(tmp_path / "Dataset7_Spleen"), "primus", ["tiny.yaml"],
                      ["train.epochs=2", "train.iters_per_epoch=2", "train.val_iters=1",
                       "model.backbone_overrides.depth=2", "head.block_indices=[0,1]",
                       *[f"{k}={v}" for k, v in over.items()]])
    return cfg


def test_resume_is_bit_identical(spleen_dirs, tmp_path):
    recipe = get_recipe("primus")
    ref = fit(_cfg(tmp_path), recipe, spleen_dirs, spleen_dirs, tmp_path / "ref", PLANS)

    calls = {"n": 0}

    def failing_step(model, batch, loss_fn, cfg):
        calls["n"] += 1
        if calls["n"] == 4:          # 2 train steps + 1 validation batch, then the first step of epoch 1
            raise KeyboardInterrupt("simulated preemption")
        logits = model(batch["image"])
        return loss_fn(logits, batch["label"]), logits

    crashing = HeadRecipe(name="primus", build_model=recipe.build_model, training_step=failing_step)
    with pytest.raises(KeyboardInterrupt):
        fit(_cfg(tmp_path), crashing, spleen_dirs, spleen_dirs, tmp_path / "run", PLANS)
    assert torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)["iteration"] == 2
    resumed = fit(_cfg(tmp_path), recipe, spleen_dirs, spleen_dirs, tmp_path / "run", PLANS)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2


def test_frozen_encoder_is_unchanged(spleen_dirs, tmp_path):
    cfg = _cfg(tmp_path, **{"model.freeze_encoder": "true", "train.epochs": 1})
    torch.manual_seed(int(cfg.seed))
    model = get_recipe("primus").build_model(cfg, 2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    dec_before = model.decoder.classifier.weight.clone()
    fit(cfg, get_recipe("primus"), spleen_dirs, spleen_dirs, tmp_path / "frozen", PLANS, model=model)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(model.decoder.classifier.weight, dec_before)


def test_fold_folder_like_nnunet(spleen_dirs, tmp_path):
    """training_log.txt, progress.png, checkpoint_best/final.pth and TensorBoard scalars, continued on resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = get_recipe("primus")
    out = tmp_path / "fold"
    cfg = _cfg(tmp_path, **{"train.tensorboard": "true"})
    model = fit(cfg, recipe, spleen_dirs, spleen_dirs, out, PLANS)
    log = (out / "training_log.txt").read_text().splitlines()
    assert "training started of 4" in log[0] and [line for line in log if ": epoch 1: train loss" in line]
    assert (out / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = out / "checkpoint_final.pth"
    assert final.stat().st_ino == (out / "checkpoints" / "latest.pt").stat().st_ino  # a link, not a copy
    assert torch.load(final, weights_only=True)["iteration"] == 4
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] in (0, 1) and set(best["model"]) == set(model.state_dict())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("finetune/train_loss")] == [2, 4]
    assert "finetune/ema_pseudo_dice" in events.Tags()["scalars"]
    cfg = _cfg(tmp_path, **{"train.epochs": 3})  # resume to a longer schedule: the log and curves continue
    fit(cfg, recipe, spleen_dirs, spleen_dirs, out, PLANS)
    log = (out / "training_log.txt").read_text()
    assert "training resumed at iteration 4 of 6" in log and ": epoch 2: train loss" in log
    assert torch.load(final, weights_only=True)["iteration"] == 6
