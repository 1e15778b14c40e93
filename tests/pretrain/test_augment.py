"""Multi-crop augmentation and HU transforms on a REAL CT slice, plus exactness of the resampling and blur."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import ndimage

from pretrain.data.augment import (
    MultiCropParams, gaussian_blur, multi_crop, resample, sample_crop_box, _gaussian_kernel,
)
from pretrain.data.transforms import HUTransform


@pytest.fixture(scope="module")
def cfg(repo_root: Path):
    return OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml")


@pytest.fixture(scope="module")
def ct_hu(real_data: Path) -> np.ndarray:
    volume = np.asanyarray(nib.load(str(real_data / "totalsegmentator" / "example_ct.nii.gz")).dataobj)
    return volume[:, :, 60].astype(np.int16)  # [122, 101] HU, abdomen


@pytest.fixture(scope="module")
def ct_slice(ct_hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(ct_hu.astype(np.float32))


def no_photometric(cfg):
    c = cfg.copy()
    c.augment.intensity.p, c.augment.noise.p = 0.0, 0.0
    c.augment.blur.global_p, c.augment.blur.local_p = [0.0, 0.0], 0.0
    return c


def test_crop_boxes_follow_scale_and_aspect() -> None:
    rng = np.random.default_rng(0)
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        areas = []
        for _ in range(500):
            top, left, h, w = sample_crop_box(512, 400, scale, (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + h <= 512 and 0 <= left and left + w <= 400
            areas.append(h * w / (512 * 400))
            assert 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05 or (h, w) == (512, 400)
        areas = np.array(areas)
        assert areas.min() >= scale[0] * 0.95 and areas.max() <= scale[1] * 1.05
        assert areas.std() > 0.02  # really random
    assert sample_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), rng)[2:] == (10, 13)  # fallback: centre crop


@pytest.mark.parametrize("box,size", [((5, 7, 80, 70), 32), ((5, 7, 20, 24), 64), ((0, 0, 122, 101), 224)])
def test_resample_equals_pil_crop_then_bicubic_resize(ct_slice: torch.Tensor, box, size: int) -> None:
    """Same pixels as torchvision's RandomResizedCrop on a PIL image (crop, then PIL bicubic resize)."""
    top, left, h, w = box
    ours = resample(ct_slice[None], size, antialias=True, box=box)[0].numpy()
    image = Image.fromarray(ct_slice.numpy(), mode="F").crop((left, top, left + w, top + h))
    pil = np.asarray(image.resize((size, size), Image.BICUBIC))
    np.testing.assert_allclose(ours, pil, atol=1e-3 * np.abs(pil).max())


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
@pytest.mark.parametrize("shape", [(2, 20, 17), (1, 150, 140)])  # conv2d path and shifted-sum path
def test_gaussian_blur_matches_scipy_separable_mirror(sigma: float, shape) -> None:
    x = torch.randn(*shape)
    kernel = _gaussian_kernel(sigma, 9).double().numpy()
    expected = np.stack([
        ndimage.correlate1d(ndimage.correlate1d(c.double().numpy(), kernel, axis=0, mode="mirror"),
                            kernel, axis=1, mode="mirror") for c in x
    ])
    np.testing.assert_allclose(gaussian_blur(x, sigma, 9).numpy(), expected, atol=1e-5)


def test_multi_crop_on_real_slice(cfg, ct_hu: np.ndarray) -> None:
    transform = HUTransform.from_config(cfg.data.transform)
    params = MultiCropParams.from_config(cfg.crops, no_photometric(cfg).augment)
    out = multi_crop(transform.prepare_slice(ct_hu), 224, 96, None, params, transform, np.random.default_rng(0))
    assert set(out) == {"global_crops", "local_crops"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    assert all(c.shape == (1, 224, 224) for c in out["global_crops"])
    assert all(c.shape == (1, 96, 96) for c in out["local_crops"])
    z_lo, z_hi = (-1000 - 65.1084) / 178.0166, (1000 - 65.1084) / 178.0166
    for crop in out["global_crops"] + out["local_crops"]:
        assert crop.min() >= z_lo - 1e-5 and crop.max() <= z_hi + 1e-5  # clamped, z-scored HU
    assert (out["global_crops"][0] - out["global_crops"][1]).abs().mean() > 0.05  # two different views


def test_photometric_augmentation_changes_values_but_keeps_structure(cfg, ct_hu: np.ndarray) -> None:
    transform = HUTransform.from_config(cfg.data.transform)
    plain = MultiCropParams.from_config(cfg.crops, no_photometric(cfg).augment)
    strong = cfg.copy()
    strong.augment.intensity.p, strong.augment.noise.p = 1.0, 1.0
    aug = MultiCropParams.from_config(cfg.crops, strong.augment)
    hu = transform.prepare_slice(ct_hu)
    a = multi_crop(hu, 64, 32, None, plain, transform, np.random.default_rng(3))["global_crops"][1]
    b = multi_crop(hu, 64, 32, None, aug, transform, np.random.default_rng(3))["global_crops"][1]
    assert not torch.equal(a, b)  # same boxes (draw count independent of the probabilities), new values
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert corr > 0.8


@pytest.mark.parametrize("no_distortions", [True, False])
def test_gram_view_is_the_same_box_at_higher_resolution(cfg, ct_hu: np.ndarray, no_distortions: bool) -> None:
    transform = HUTransform.from_config(cfg.data.transform)
    c = no_photometric(cfg)
    c.crops.gram_teacher_no_distortions = no_distortions
    params = MultiCropParams.from_config(c.crops, c.augment)
    hu = transform.prepare_slice(ct_hu)
    out = multi_crop(hu, 64, 32, 128, params, transform, np.random.default_rng(5))
    for student, gram in zip(out["global_crops"], out["gram_teacher_crops"]):
        assert gram.shape == (1, 128, 128)
        down = resample(gram, 64, antialias=True)
        # same box and flip: only resampling differences remain
        assert (down - student).abs().mean() < 0.05 * student.abs().mean()


def test_window_set_and_random_window_transforms(cfg) -> None:
    ws = cfg.data.transform.copy()
    ws.mode = "window_set"
    t = HUTransform.from_config(ws)
    hu = torch.tensor([[40.0, -1000.0, 3000.0]])
    x = t(hu)
    assert x.shape == (3, 1, 3) and t.out_channels == 3
    # 40 HU is the centre of the soft-tissue window (40, 400) -> 0.5 before the z-score
    assert x[0, 0, 0].item() == pytest.approx((0.5 - 0.485) / 0.229, rel=1e-5)
    assert x[2, 0, 2].item() == pytest.approx((1.0 - 0.406) / 0.225, rel=1e-5)  # bone window saturates
    rw = cfg.data.transform.copy()
    rw.mode = "random_window"
    t = HUTransform.from_config(rw)
    rng = np.random.default_rng(0)
    windows = {t.sample_window(rng) for _ in range(50)}
    assert len(windows) > 10
    lo, hi = t.preclamp_range()
    assert all(lo <= a < b <= hi for a, b in windows)
    bad = cfg.data.transform.copy()
    bad.mode = "solarize"
    with pytest.raises(ValueError, match="data.transform.mode"):
        HUTransform.from_config(bad)
