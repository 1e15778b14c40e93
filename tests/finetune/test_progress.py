"""The fold folder's moving-average pseudo-Dice and progress.png, checked against nnU-Net's own logger."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from finetune.progress import ema_pseudo_dice, plot_progress, read_epoch_records


def _records(dices):
    return [{"epoch": e, "iteration": 2 * (e + 1), "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
             "pseudo_dice": [d], "mean_pseudo_dice": d, "lr": [1e-3 * (1 - e / 10), 1e-4], "epoch_seconds": 3.0 + e}
            for e, d in enumerate(dices)]


def test_moving_average_is_nnunets(tmp_path):
    logging = pytest.importorskip("nnunetv2.training.logging.nnunet_logger")
    dices = [0.1, 0.5, 0.45, 0.8, 0.7]
    logger = logging.MetaLogger(str(tmp_path), resume=False)
    for epoch, d in enumerate(dices):
        logger.log("mean_fg_dice", d, epoch)
    assert ema_pseudo_dice(_records(dices)) == pytest.approx(logger.get_value("ema_fg_dice", step=None), abs=1e-12)


def test_progress_png_and_resumed_records(tmp_path):
    records = _records([0.1, 0.5, 0.45])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"epoch\": 3, \"itera")  # cut last line
    assert [r["epoch"] for r in read_epoch_records(metrics, up_to_iteration=4)] == [0, 1]
    png = plot_progress(read_epoch_records(metrics, up_to_iteration=6), tmp_path / "progress.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[1] > img.size[0]  # three stacked panels
