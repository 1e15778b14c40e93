"""Preprocessing on the real MSD spleen case: nnU-Net CT normalisation, in-plane resampling, geometry round trip,
clear errors for mismatched image/label pairs."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from finetune.preprocess import (Plans, foreground_samples, load_plans, normalize, nonzero_bbox, plan_from_training_cases,
                                 preprocess_dataset, preprocess_volume, read_case, read_volume, restore_geometry,
                                 save_plans)
from meddino_datasets.case import Case

PCFG = OmegaConf.create({"preprocess": {"crop_to_nonzero": True, "target_spacing_mm": None, "target_slice_px": None,
                                        "image_order": 3, "foreground_samples_total": 1.0e6,
                                        "clip_percentiles": [0.5, 99.5], "normalization": "ct"},
                         "data": {"patch_size": [896, 896]}})


@pytest.fixture(scope="module")
def spleen_case(real_data) -> Case:
    d = real_data / "ivadomed_msd_spleen"
    return Case("spleen2", d / "sub-spleen2_ct.nii.gz", d / "sub-spleen2_ct_seg-manual.nii.gz")


def test_read_volume_is_axial_first(spleen_case):
    vol = read_volume(spleen_case.image)
    assert vol.array.shape == (26, 166, 164)                   # NIfTI (164, 166, 26) -> [Z, Y, X]
    assert vol.spacing_zyx == pytest.approx((5.0, 0.7949, 0.7949), abs=1e-3)


def test_plans_follow_nnunet_ct_normalisation(spleen_case):
    labels = ["background", "spleen"]
    plans = plan_from_training_cases([spleen_case], labels, PCFG)
    image, label = read_case(spleen_case, 2)
    fg = image.array[label > 0]
    # 1e6 draws with replacement from the 96,672 foreground voxels: close to the full statistics
    assert plans.mean == pytest.approx(fg.mean(), abs=3.0)
    assert plans.clip_low == pytest.approx(np.percentile(fg, 0.5), abs=10)
    assert plans.clip_high == pytest.approx(np.percentile(fg, 99.5), abs=10)
    assert plans.target_spacing_yx == pytest.approx([0.7949, 0.7949], abs=1e-3)
    assert plans.patch_size == [896, 896]                      # the plans carry the network input, as nnU-Net's
    norm = normalize(image.array, plans)
    assert norm.max() == pytest.approx((plans.clip_high - plans.mean) / plans.std, rel=1e-5)
    # paper-style 896 px slices: spacing scaled so the median slice (166 px at 0.795 mm) becomes 896 px
    cfg896 = OmegaConf.merge(PCFG, {"preprocess": {"target_slice_px": 896}})
    p896 = plan_from_training_cases([spleen_case], labels, cfg896)
    assert p896.target_spacing_yx[0] == pytest.approx(0.7949 * 166 / 896, rel=1e-3)
    out, lab, props = preprocess_volume(image, p896, label)
    assert out.shape[0] == 26 and max(out.shape[1:]) == 896 and lab.shape == out.shape


def test_foreground_samples_are_nnunet_fingerprint_draws(spleen_case):
    """The same draws as nnU-Net's DatasetFingerprintExtractor (seed 1234 per case, with replacement, 1e8 // n)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    image, label = read_case(spleen_case, 2)
    box = nonzero_bbox(image.array)
    img, lab = (a[tuple(slice(lo, hi) for lo, hi in box)] for a in (image.array, label))
    theirs, _ = DatasetFingerprintExtractor.collect_foreground_intensities(lab[None], img[None], num_samples=333_333)
    np.testing.assert_array_equal(foreground_samples(img, lab, 333_333), theirs[0])
    cfg = OmegaConf.merge(PCFG, {"preprocess": {"foreground_samples_total": 2_000_000}})
    plans = plan_from_training_cases([spleen_case, spleen_case], ["background", "spleen"], cfg)
    pooled = np.concatenate([foreground_samples(img, lab, 1_000_000)] * 2)
    assert plans.mean == pytest.approx(float(pooled.mean()), rel=1e-6)
    assert plans.clip_high == pytest.approx(float(np.percentile(pooled, 99.5)))


def test_zscore_normalisation_is_per_image(spleen_case):
    """amos22_ct_mri: nnU-Net's ZScoreNormalization (this image's mean/std, no clipping) for a CT-or-MR channel."""
    image = read_volume(spleen_case.image)
    plans = Plans(target_spacing_yx=[1.0, 1.0], clip_low=-100, clip_high=300, mean=80, std=40,
                  labels=["background", "spleen"], patch_size=[64, 64], normalization="zscore")
    out = normalize(image.array, plans)
    assert out.mean() == pytest.approx(0.0, abs=1e-4) and out.std() == pytest.approx(1.0, abs=1e-4)
    x = image.array.astype(np.float64)
    np.testing.assert_allclose(out, (x - x.mean()) / x.std(), atol=1e-4)    # no clipping to the plans' CT range
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalize(image.array, Plans(**{**plans.to_dict(), "normalization": "minmax"}))


def test_preprocess_then_restore_reproduces_the_label(spleen_case):
    image, label = read_case(spleen_case, 2)
    plans = Plans(target_spacing_yx=[1.3, 1.1], clip_low=-100, clip_high=300, mean=80, std=40,
                  labels=["background", "spleen"], patch_size=[64, 64])
    arr, lab, props = preprocess_volume(image, plans, label)
    assert arr.shape[1:] == (round(166 * 0.7949 / 1.3), round(164 * 0.7949 / 1.1))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(lab.astype(np.int64)), 2).permute(3, 0, 1, 2).float()
    back = restore_geometry(onehot, props)
    assert back.shape == label.shape
    inter = np.logical_and(back == 1, label == 1).sum()
    assert 2 * inter / ((back == 1).sum() + (label == 1).sum()) > 0.95


def test_nonzero_bbox_crops_padding():
    a = np.zeros((4, 10, 10), np.float32)
    a[1:3, 2:7, 3:9] = -1000.0
    assert nonzero_bbox(a) == [[1, 3], [2, 7], [3, 9]]


def test_mismatched_pairs_name_the_case(spleen_case, tmp_path):
    img = nib.load(str(spleen_case.label))
    shifted = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine @ np.diag([1, 1, 1, 1.0]) + np.array(
        [[0, 0, 0, 5.0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]))
    nib.save(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ValueError, match="case spleen2: image and label affines differ"):
        read_case(Case("spleen2", spleen_case.image, tmp_path / "shifted.nii.gz"), 2)
    nib.save(img.slicer[:, :, :10], str(tmp_path / "short.nii.gz"))
    with pytest.raises(ValueError, match="case spleen2: .*shape"):
        read_case(Case("spleen2", spleen_case.image, tmp_path / "short.nii.gz"), 2)
    with pytest.raises(ValueError, match="outside 0..0"):
        read_case(spleen_case, 1)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        read_volume(tmp_path / "broken.nii.gz")


def test_cache_is_reused(spleen_case, tmp_path):
    plans = Plans(target_spacing_yx=[2.0, 2.0], clip_low=-100, clip_high=300, mean=80, std=40,
                  labels=["background", "spleen"], patch_size=[64, 64])
    dirs = preprocess_dataset([spleen_case], plans, tmp_path)
    case_dir = dirs["spleen2"]
    stamp = (case_dir / "image.npy").stat().st_mtime_ns
    assert preprocess_dataset([spleen_case], plans, tmp_path)["spleen2"] == case_dir
    assert (case_dir / "image.npy").stat().st_mtime_ns == stamp
    assert (tmp_path / plans.digest() / "plans.json").exists()
    # the patch size is not a preprocessing setting: heads with other patches reuse the same cache
    other_patch = Plans(**{**plans.to_dict(), "patch_size": [128, 128]})
    assert other_patch.digest() == plans.digest()
    assert preprocess_dataset([spleen_case], other_patch, tmp_path)["spleen2"] == case_dir
    assert (case_dir / "image.npy").stat().st_mtime_ns == stamp


def test_plans_round_trip_and_older_plans_take_the_patch_from_their_config(tmp_path):
    plans = Plans(target_spacing_yx=[2.0, 2.0], clip_low=-100, clip_high=300, mean=80, std=40,
                  labels=["background", "spleen"], patch_size=[160, 128])
    save_plans(plans, tmp_path / "new" / "plans.json")
    assert load_plans(tmp_path / "new" / "plans.json") == plans
    old = tmp_path / "old"                                     # a run folder written before plans had patch_size
    old.mkdir()
    (old / "plans.json").write_text(json.dumps({k: v for k, v in plans.to_dict().items() if k != "patch_size"}))
    (old / "config.yaml").write_text("data:\n  patch_size: [160, 128]\n")
    assert load_plans(old / "plans.json") == plans
    (old / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"old/plans.json: not a valid plans.json .*patch_size"):
        load_plans(old / "plans.json")


def test_resampled_image_stays_in_the_input_range(spleen_case):
    """Cubic splines overshoot at sharp edges; the resampled image is clipped to the input's range."""
    image = read_volume(spleen_case.image)
    plans = Plans(target_spacing_yx=[0.35, 0.35], clip_low=-1000, clip_high=1500, mean=0, std=1,
                  labels=["background", "spleen"], patch_size=[64, 64], crop_to_nonzero=False)
    arr, _, _ = preprocess_volume(image, plans)
    assert arr.max() <= image.array.max() and arr.min() >= image.array.min()
    assert arr.max() == pytest.approx(image.array.max(), abs=1.0)          # clipped, not shrunk


def test_predictions_are_resampled_as_logits():
    """Three classes on two pixels A, B: the midpoint of their logits is class 2, the midpoint of their softmax
    probabilities class 0 — nnU-Net resamples logits, so the restored middle pixel is class 2."""
    logits = torch.tensor([[5.0, 0.1], [0.0, 5.0], [4.0, 4.0]])[:, None, None, :]   # [K=3, Z=1, Y=1, X=2]
    props = {"cropped_shape_zyx": [1, 1, 3], "shape_zyx": [1, 1, 3], "bbox": [[0, 1], [0, 1], [0, 3]]}
    assert restore_geometry(logits, props)[0, 0].tolist() == [0, 2, 1]
    assert restore_geometry(logits.softmax(0), props)[0, 0, 1] == 0      # what resampling probabilities gives
