"""pretrain.visualize on real CT: orientation, HU transform, foreground masking, PCA, similarity, curves, config, CLI."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.visualize.cli import main
from pretrain.visualize.config import load_config
from pretrain.visualize.curves import curve_keys, metric_series, read_metrics
from pretrain.visualize.features import (body_mask, first_component_foreground, fit_pca, input_size, pca_maps,
                                         pixel_to_patch, similarity_map, slice_features, upsample_nearest)
from pretrain.visualize.inputs import (AxialSlice, body_voxel_counts, default_slice, load_axial_slice,
                                       load_input_transform, transform_config_for)
from pretrain.models import load_backbone

LIVER, SPLEEN, VERTEBRA_L1 = 5, 1, 31  # TotalSegmentator "total" class ids (class_map_total.json)


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def transform(cfg):
    return load_input_transform(transform_config_for("random:vitt16", cfg))


@pytest.fixture(scope="module")
def ct_path(real_data: Path) -> Path:
    return real_data / "totalsegmentator" / "example_ct.nii.gz"


@pytest.fixture(scope="module")
def ct_slice(ct_path: Path, cfg) -> AxialSlice:
    return load_axial_slice(ct_path, None, cfg.foreground.body_threshold_hu)


@pytest.fixture(scope="module")
def tiny_model(golden_dir: Path) -> torch.nn.Module:
    """The golden tiny DINOv3 ViT (embed 64, depth 4, official ViT-B/16 settings, random non-trivial weights)."""
    model = load_backbone(golden_dir / "tiny_vit_official.pth")
    assert model.embed_dim == 64 and model.n_blocks == 4
    return model


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def test_axial_slice_is_radiological_convention(real_data: Path, cfg) -> None:
    """Liver on the image left (patient's right), spleen on the right, spine at the bottom (posterior)."""
    seg_path = real_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"
    seg = np.asanyarray(nib.as_closest_canonical(nib.load(seg_path)).dataobj)
    z = int(np.argmax(np.minimum((seg == LIVER).sum((0, 1)), (seg == SPLEEN).sum((0, 1)))))
    labels = load_axial_slice(seg_path, z, cfg.foreground.body_threshold_hu).hu
    width, height = labels.shape[1], labels.shape[0]
    assert np.nonzero(labels == LIVER)[1].mean() < width / 2 < np.nonzero(labels == SPLEEN)[1].mean()
    z_spine = int(np.argmax((seg == VERTEBRA_L1).sum((0, 1))))
    spine_rows = np.nonzero(load_axial_slice(seg_path, z_spine, 0).hu == VERTEBRA_L1)[0]
    assert spine_rows.mean() > height / 2


def test_load_axial_slice_defaults_to_body_and_rejects_bad_index(ct_path: Path, ct_slice, cfg, real_data) -> None:
    assert ct_slice.hu.shape == (101, 122) and ct_slice.spacing_mm == (3.0, 3.0)
    body = body_voxel_counts(np.asanyarray(nib.as_closest_canonical(nib.load(ct_path)).dataobj), -500)
    assert body[ct_slice.index] >= 0.9 * body.max()
    # a volume cropped to the body (many slices tie): a middle slice, not the first
    spleen = load_axial_slice(real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz", None, -500)
    assert 5 <= spleen.index <= 20 and spleen.hu.shape == (166, 164)
    assert default_slice(np.array([0, 5, 10, 10, 9, 2]), 0.9) == 3
    assert ct_slice.hu.min() < -900 and ct_slice.hu.max() > 300  # air and bone: real HU
    with pytest.raises(ValueError, match="outside the 112 axial slices"):
        load_axial_slice(ct_path, 500, cfg.foreground.body_threshold_hu)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        load_axial_slice(ct_path.parent / "missing.nii.gz", None, -500)


def test_hu_transform_is_meddinov3_default(transform) -> None:
    hu = torch.tensor([[-3000.0, -1000.0], [65.1084, 4000.0]])
    x = transform(hu)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    expected = (torch.tensor([[-1000.0, -1000.0], [65.1084, 1000.0]]) - 65.1084) / 178.0166
    for c in range(3):
        torch.testing.assert_close(x[c], expected)


def test_transform_follows_the_runs_config(tmp_path: Path, cfg, repo_root: Path) -> None:
    """A checkpoint inside a run folder uses that run's data.transform, not the default."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "model_0000010.pth"
    ckpt.write_bytes(b"")
    run_cfg = OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml")
    run_cfg.data.transform.mean = 0.0
    run_cfg.data.transform.std = 1000.0
    OmegaConf.save(run_cfg, run / "config.yaml")
    assert transform_config_for(str(ckpt), cfg) == run / "config.yaml"
    x = load_input_transform(run / "config.yaml")(torch.tensor([[500.0]]))
    torch.testing.assert_close(x, torch.full((3, 1, 1), 0.5))
    assert transform_config_for("random:vitt16", cfg) == repo_root / "configs" / "pretrain" / "base.yaml"
    explicit = OmegaConf.merge(cfg, {"transform_config": str(run / "config.yaml")})
    assert transform_config_for("random:vitt16", explicit) == run / "config.yaml"
    (tmp_path / "bad.yaml").write_text("optim: {lr: 1}\n")
    with pytest.raises(ValueError, match="bad.yaml: no data.transform"):
        load_input_transform(tmp_path / "bad.yaml")


def test_body_mask_excludes_air_and_table(ct_slice, cfg) -> None:
    mask = body_mask(ct_slice.hu, cfg.foreground.body_threshold_hu)
    h, w = mask.shape
    assert mask[h // 2, w // 2] and not mask[0, 0] and not mask[-1, -1]
    assert 0.3 < mask.mean() < 0.9
    from scipy import ndimage

    assert ndimage.label(mask)[1] == 1  # one component: table and outside air removed, holes filled
    # the table: dense pixels below the body that are not in the mask
    assert ((ct_slice.hu > cfg.foreground.body_threshold_hu) & ~mask).any()


def test_input_size_keeps_physical_aspect() -> None:
    assert input_size((101, 122), (3.0, 3.0), 224, 16) == (192, 224)
    assert input_size((100, 100), (2.0, 1.0), 128, 16) == (128, 64)
    assert input_size((101, 122), (3.0, 3.0), 100, 16, keep_aspect=False) == (96, 96)


def test_pca_rgb_is_masked_to_foreground(tiny_model, ct_slice, cfg, transform) -> None:
    from omegaconf import OmegaConf

    resolutions = [64, 128]
    for fit in ("joint", "separate"):
        run_cfg = OmegaConf.merge(cfg, {"pca": {"fit": fit}})
        rgbs, masks = pca_maps(tiny_model, ct_slice, resolutions, run_cfg, transform)
        for r, rgb, fg in zip(resolutions, rgbs, masks):
            h, w = input_size(ct_slice.hu.shape, ct_slice.spacing_mm, r, 16)
            assert rgb.shape == (h // 16, w // 16, 3) and fg.shape == (h // 16, w // 16)
            assert 0 < fg.sum() < fg.size
            assert np.all(rgb[~fg] == 0.0)
            assert rgb.min() >= 0.0 and rgb.max() <= 1.0
            assert rgb[fg].std(axis=0).min() > 0.05  # three informative channels, not a flat colour
    # the body-mask foreground agrees with the body: the centre patch is in, the corners are out
    assert masks[1][masks[1].shape[0] // 2, masks[1].shape[1] // 2] and not masks[1][0, 0]


def test_first_component_foreground_oriented_low_at_border(tiny_model, ct_slice, transform) -> None:
    feats = slice_features(tiny_model, ct_slice, 128, transform)
    fg = first_component_foreground(feats, 0.0)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    assert fg.any() and border.mean() < fg.mean()


def test_fit_pca_matches_covariance_eigenvectors() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * np.array([5, 3, 2, 1, 1, 1, 1, 1])
    basis = fit_pca(x, 3)
    eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))
    top = eigvec[:, ::-1][:, :3].T
    assert np.allclose(np.abs(np.sum(basis.components * top, axis=1)), 1.0, atol=1e-8)
    assert np.allclose(basis.components @ basis.components.T, np.eye(3), atol=1e-10)


def test_similarity_is_one_at_reference_patch(tiny_model, ct_slice, cfg, transform) -> None:
    point = (50.0, 40.0)
    sim, ref = similarity_map(tiny_model, ct_slice, point, 128, cfg, transform)
    assert math.isclose(float(sim[ref]), 1.0, abs_tol=1e-5)
    assert sim.max() <= 1.0 + 1e-5 and sim.min() >= -1.0 - 1e-5
    assert (sim < 0.99).mean() > 0.5  # other patches differ from the reference
    # the reference pixel falls inside the chosen patch of the resized image
    h, w = sim.shape
    assert ref == (int((point[0] + 0.5) / 101 * h), int((point[1] + 0.5) / 122 * w))
    # the marked pixel of the displayed (upsampled) map is the 1.0 cell, for every reference pixel
    for y in range(0, 101, 7):
        for x in range(0, 122, 9):
            i, j = pixel_to_patch((y, x), (101, 122), (h, w))
            assert upsample_nearest(np.arange(h * w).reshape(h, w), (101, 122))[y, x] == i * w + j
    with pytest.raises(ValueError, match="outside"):
        pixel_to_patch((101, 0), (101, 122), (6, 8))


def test_pca_cli_writes_png(tmp_path: Path, ct_path: Path, golden_dir: Path, cfg) -> None:
    out = tmp_path / "pca.png"
    rc = main(["pca", "--checkpoint", str(golden_dir / "tiny_vit_official.pth"), "--image", str(ct_path), "--resolutions", "64,96,128",
                   "--out", str(out)])
    assert rc == 0 and out.is_file()
    panel, dpi = cfg.panel_size_in, cfg.dpi
    assert _png_size(out) == (round(panel * 4 * dpi), round((panel + 0.4) * dpi))
    pixels = _png_pixels(out)
    assert pixels.std() > 20  # CT and colour maps, not a blank page
    assert len(list(tmp_path.iterdir())) == 1  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes


def test_similarity_cli_several_checkpoints(tmp_path: Path, ct_path: Path, golden_dir: Path, cfg) -> None:
    out = tmp_path / "sub" / "sim.png"
    specs = [str(golden_dir / "tiny_vit_official.pth"), "random:vitt16"]
    rc = main(["similarity", "--checkpoint", *specs, "--image", str(ct_path), "--slice", "60",
                   "--point", "50,40", "--resolution", "96", "--out", str(out)])
    assert rc == 0
    panel, dpi = cfg.panel_size_in, cfg.dpi
    assert _png_size(out) == (round(panel * 3 * dpi), round((panel + 0.4) * dpi))
    assert _png_pixels(out).std() > 20


def test_cli_reports_bad_input(tmp_path: Path, ct_path: Path, capsys) -> None:
    rc = main(["similarity", "--checkpoint", "random:vitt16", "--image", str(ct_path),
                   "--point", "500,0", "--resolution", "64", "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "outside the 101x122 slice" in capsys.readouterr().err
    rc = main(["pca", "--checkpoint", str(tmp_path / "nope.pth"), "--image", str(ct_path),
                   "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "nope.pth" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    rc = main(["pca", "--checkpoint", str(tmp_path / "garbage.pth"), "--image", str(ct_path),
                   "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "garbage.pth" in capsys.readouterr().err
    rc = main(["pca", "--checkpoint", "random:vitx99", "--image", str(ct_path), "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "vitx99" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _write_metrics(path: Path, n: int = 30, stage2_from: int = 15, truncated_tail: bool = True) -> None:
    """Records as the trainer logs them: losses, schedules, gram_loss only from stage 2, one NaN."""
    lines = []
    for it in range(0, n, 3):
        record = {
            "iteration": it, "total_loss": 20.0 - 0.3 * it, "dino_local_crops_loss": 10.0 - 0.1 * it,
            "dino_global_crops_loss": 9.5 - 0.1 * it, "ibot_loss": 9.0 - 0.05 * it, "koleo_loss": -0.1 * it,
            "lr": 1e-4 * min(1.0, it / 10), "wd": 0.04 + 0.001 * it, "mom": 0.992 + 1e-4 * it,
            "teacher_temp": 0.04 + 0.001 * it,
        }
        if it >= stage2_from:
            record["gram_loss"] = 1.0 / (1 + it)
        if it == 9:
            record["total_loss"] = float("nan")
        if it == 12:
            record["koleo_loss"] = float("inf")
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if truncated_tail:
        text += '{"iteration": 99, "total_lo'
    path.write_text(text)


def test_read_metrics_tolerates_missing_keys_and_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path)
    records = read_metrics(path)
    assert [r["iteration"] for r in records] == list(range(0, 30, 3))
    iters, gram = metric_series(records, "gram_loss")
    assert iters.tolist() == [15, 18, 21, 24, 27] and gram.shape == (5, 1)
    _, total = metric_series(records, "total_loss")
    assert np.isnan(total[3, 0]) and np.isfinite(np.delete(total, 3)).all()
    _, koleo = metric_series(records, "koleo_loss")
    assert np.isnan(koleo[4, 0]) and np.isfinite(np.delete(koleo, 4)).all()
    keys = curve_keys([records], ["total_loss", "ibot_loss"], ["lr", "teacher_temp"])
    assert keys[:2] == ["total_loss", "ibot_loss"] and keys[-2:] == ["lr", "teacher_temp"]
    assert "gram_loss" in keys and "koleo_loss" in keys and "wd" not in keys

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"iteration": 0, "total_loss": 1}\nnot json\n{"iteration": 1, "total_loss": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics(bad)


def test_curves_cli_writes_png(tmp_path: Path, cfg) -> None:
    run1, run2 = tmp_path / "stage1", tmp_path / "stage2"
    run1.mkdir(), run2.mkdir()
    _write_metrics(run1 / "metrics.jsonl", stage2_from=1000)
    _write_metrics(run2 / "metrics.jsonl", truncated_tail=False)
    out = tmp_path / "curves.png"
    rc = main(["curves", "--metrics", str(run1 / "metrics.jsonl"), str(run2 / "metrics.jsonl"),
                   "--smoothing", "3", "--out", str(out)])
    assert rc == 0
    # 6 losses + 4 schedules = 10 panels in 3 columns -> 4 rows
    panel, dpi = cfg.panel_size_in, cfg.dpi
    assert _png_size(out) == (round(panel * 1.3 * 3 * dpi), round(panel * 4 * dpi))
    assert _png_pixels(out).std() > 10


def test_curves_read_what_the_trainer_logs(tmp_path: Path, cfg) -> None:
    """Records written by pretrain.train's MetricsLogger (the real writer) are read and plotted."""
    from omegaconf import OmegaConf

    from pretrain.train.metrics_log import MetricsLogger

    logger_cfg = OmegaConf.create({"stage": "stage2", "logging": {"console_every": 100, "tensorboard": False}})
    logger = MetricsLogger(tmp_path, logger_cfg, total_iterations=6, start_iteration=0, is_main=True)
    for it in range(6):
        logger.log({"iteration": it, "dino_global_loss": 7.0 - 0.1 * it, "dino_local_loss": 7.1 - 0.1 * it,
                    "ibot_loss": 3.5, "koleo_loss": 1.0 / (it + 1), "gram_loss": 0.2, "gram_weight": 2.0,
                    "total_loss": 12.0 - 0.2 * it, "lr": 1e-4, "last_layer_lr": 0.0, "wd": 0.04, "mom": 0.994,
                    "teacher_temp": 0.07, "global_crops_size": 64, "grad_norm": 3.0})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 6
    keys = curve_keys([records], list(cfg.curves.loss_keys), [*cfg.curves.schedule_keys, *cfg.curves.diagnostic_keys])
    assert keys == ["total_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "gram_loss",
                    "lr", "wd", "mom", "teacher_temp", "gram_weight", "grad_norm"]
    assert main(["curves", "--metrics", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "c.png")]) == 0
    assert _png_size(tmp_path / "c.png") == (round(cfg.panel_size_in * 1.3 * 3 * cfg.dpi), round(cfg.panel_size_in * 4 * cfg.dpi))


def test_last_block_equals_final_normed_tokens(tiny_model, ct_slice, transform) -> None:
    """--layer n_blocks-1 (get_intermediate_layers, normed) gives the same features as forward_features."""
    last = slice_features(tiny_model, ct_slice, 64, transform, layer=tiny_model.n_blocks - 1)
    final = slice_features(tiny_model, ct_slice, 64, transform)
    np.testing.assert_allclose(last, final, atol=1e-5)
    first = slice_features(tiny_model, ct_slice, 64, transform, layer=0)
    assert first.shape == final.shape and not np.allclose(first, final, atol=1e-3)


def test_module_entry_point(tmp_path: Path, repo_root: Path) -> None:
    """``python -m pretrain.visualize`` is the documented command (error exit codes are tested via main)."""
    import subprocess
    import sys

    _write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "pretrain.visualize", "curves", "--metrics",
                           str(tmp_path / "metrics.jsonl"), "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and _png_size(out)[0] > 0


def test_curves_of_a_finetune_log(tmp_path: Path, cfg) -> None:
    """finetune.train's metrics.jsonl: per-group lr and per-class pseudo-Dice lists become one line each."""
    lines = [json.dumps({"epoch": e, "iteration": 10 * (e + 1), "train_loss": 1.0 / (e + 1), "val_loss": 1.2 / (e + 1),
                         "pseudo_dice": [0.1 * e, 0.05 * e] if e else [None, 0.0], "mean_pseudo_dice": 0.07 * e,
                         "grad_norm": 2.0, "lr": [1e-4, 3e-5], "epoch_seconds": 3.0}) for e in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records = read_metrics(tmp_path / "metrics.jsonl")
    iters, dice = metric_series(records, "pseudo_dice")
    assert iters.tolist() == [10, 20, 30, 40] and dice.shape == (4, 2) and np.isnan(dice[0, 0])
    keys = curve_keys([records], list(cfg.curves.loss_keys), [*cfg.curves.schedule_keys, *cfg.curves.diagnostic_keys])
    assert keys == ["train_loss", "val_loss", "lr", "grad_norm", "mean_pseudo_dice", "pseudo_dice"]
    assert main(["curves", "--metrics", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "f.png")]) == 0
    assert _png_pixels(tmp_path / "f.png").std() > 10


# ------------------------------------------------------------------------------------------------ config
def test_config_file_is_a_layer_and_flags_are_checked(tmp_path: Path, ct_path: Path, capsys) -> None:
    """``--config`` changes only the keys it names (the rest stays configs/visualize.yaml's); an undeclared key or a
    value of the wrong type, in the file or from a flag, is one line naming it (exit 2), and no PNG is written."""
    (tmp_path / "small.yaml").write_text("dpi: 40\ncurves: {columns: 2}\n")
    cfg = load_config(tmp_path / "small.yaml", {"curves.smoothing_window": 4, "image.slice": 7})
    assert cfg.dpi == 40 and cfg.curves.columns == 2 and cfg.curves.smoothing_window == 4 and cfg.image.slice == 7
    assert cfg.panel_size_in == load_config().panel_size_in and list(cfg.pca.resolutions) == [224, 448, 896]
    _write_metrics(tmp_path / "metrics.jsonl", truncated_tail=False)
    out = tmp_path / "c.png"
    assert main(["curves", "--metrics", str(tmp_path / "metrics.jsonl"), "--config", str(tmp_path / "small.yaml"),
                 "--out", str(out)]) == 0
    # 10 panels (6 losses + 4 schedules, as in test_curves_cli_writes_png) in 2 columns -> 5 rows, at 40 dpi
    width, height = _png_size(out)
    panel = load_config().panel_size_in
    assert abs(width - panel * 1.3 * 2 * 40) <= 1 and abs(height - panel * 5 * 40) <= 1

    (tmp_path / "typo.yaml").write_text("similarity: {colourmap: viridis}\n")
    rc = main(["curves", "--metrics", str(tmp_path / "metrics.jsonl"), "--config", str(tmp_path / "typo.yaml"),
               "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "typo.yaml" in err and "similarity.colourmap" in err and "similarity.colormap" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "wrong_type.yaml").write_text("pca: {resolutions: 224}\n")
    with pytest.raises(ValueError, match="pca.resolutions"):
        load_config(tmp_path / "wrong_type.yaml")
    with pytest.raises(ValueError, match="unknown config key image.slise"):
        load_config(None, {"image.slise": 3})
    rc = main(["curves", "--metrics", str(tmp_path / "metrics.jsonl"), "--config", str(tmp_path / "missing.yaml"),
               "--out", str(tmp_path / "x.png")])
    assert rc == 2 and "missing.yaml" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_flags_map_to_declared_keys() -> None:
    """Every flag that sets a config value names a key configs/visualize.yaml declares."""
    from omegaconf import OmegaConf

    from pretrain.visualize.cli import FLAG_KEYS, build_parser, flag_overrides

    cfg = load_config()
    assert all(OmegaConf.select(cfg, key, default="absent") != "absent" for key in FLAG_KEYS.values())
    args = build_parser().parse_args(["pca", "--checkpoint", "random:vitt16", "--image", "x.nii.gz", "--out", "p.png",
                                      "--resolutions", "64,96", "--pca-fit", "separate", "--slice", "3"])
    assert flag_overrides(args) == {"pca.resolutions": [64, 96], "pca.fit": "separate", "image.slice": 3}


# ------------------------------------------------------------------------------------------------ inputs
def test_damaged_nifti_is_one_clear_error(tmp_path: Path, ct_path: Path, capsys) -> None:
    """A truncated copy of the real CT: a ValueError naming the file, exit 2 from the CLI, no traceback."""
    damaged = tmp_path / "truncated_ct.nii.gz"
    damaged.write_bytes(ct_path.read_bytes()[: ct_path.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated_ct.nii.gz"):
        load_axial_slice(damaged, None, -500)
    rc = main(["pca", "--checkpoint", "random:vitt16", "--image", str(damaged), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "truncated_ct.nii.gz" in err and "Traceback" not in err


def test_random_backbone_is_seeded() -> None:
    from pretrain.visualize.inputs import resolve_backbone

    a, label = resolve_backbone("random:vitt16", 3)
    b, _ = resolve_backbone("random:vitt16", 3)
    c, _ = resolve_backbone("random:vitt16", 4)
    assert label == "random init (vitt16)" and not a.training
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.equal(a.cls_token, c.cls_token)
    with pytest.raises(ValueError, match="give an architecture"):
        resolve_backbone("random:", 0)


# ------------------------------------------------------------------------------------------------ features
def test_patch_fraction_and_window() -> None:
    from pretrain.visualize.features import patch_fraction
    from pretrain.visualize.figures import window_for_display

    mask = np.zeros((4, 6), dtype=bool)
    mask[:2, :3] = True  # the top-left patch of a 2x2 grid, fully
    mask[2, 3] = True  # one pixel of the bottom-right patch (1 of 6)
    np.testing.assert_allclose(patch_fraction(mask, (2, 2)), [[1.0, 0.0], [0.0, 1 / 6]], atol=1e-6)
    np.testing.assert_allclose(window_for_display(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), (-160, 240)),
                               [0.0, 0.0, 0.5, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------ curves
def test_moving_average_is_trailing_and_skips_non_finite() -> None:
    from pretrain.visualize.curves import moving_average

    values = np.array([1.0, 3.0, np.nan, 5.0, np.inf, 7.0])
    np.testing.assert_allclose(moving_average(values, 3), [1.0, 2.0, 2.0, 4.0, 5.0, 6.0])
    assert moving_average(values, 1) is values
    assert np.isnan(moving_average(np.array([np.nan, np.nan]), 2)).all()
