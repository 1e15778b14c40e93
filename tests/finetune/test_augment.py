"""2-D augmentation against batchgeneratorsv2 itself (nnU-Net's settings), on a real CT slice and its 117-class
TotalSegmentator label map: the same sampling grid must give the same image and the same labels."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from finetune.augment import resample_labels, rotate_scale_window, simulate_lowres, window_grid
from finetune.config import load_config


@pytest.fixture(scope="module")
def ct_slice(real_data):
    d = real_data / "totalsegmentator"
    image = np.asanyarray(nib.load(str(d / "example_ct.nii.gz")).dataobj)
    label = np.asanyarray(nib.load(str(d / "example_seg_fast_force_split.nii.gz")).dataobj)
    z = int(np.argmax([len(np.unique(label[..., k])) for k in range(label.shape[2])]))   # the busiest slice
    img = torch.from_numpy(np.ascontiguousarray(image[..., z].T, dtype=np.float32))[None]
    lab = torch.from_numpy(np.ascontiguousarray(label[..., z].T).astype(np.int16))[None]
    assert len(torch.unique(lab)) > 10
    return img, lab


def _nnunet_spatial(patch):
    """batchgeneratorsv2 SpatialTransform exactly as nnU-Net's get_training_transforms builds it for 2-D."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    return SpatialTransform(patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                            p_rotation=0.2, rotation=(-math.pi, math.pi), p_scaling=0.2, scaling=(0.7, 1.4),
                            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False,
                            border_mode_seg="constant", padding_value_seg=-1)


@pytest.mark.parametrize("top_left,angle,scale", [((20, 30), 0.7, 1.0), ((-15, 40), -2.1, 1.3), ((60, -10), 3.0, 0.75),
                                                  ((0, 0), 0.0, 1.4)])
def test_spatial_interpolation_matches_batchgeneratorsv2(ct_slice, top_left, angle, scale):
    image, label = ct_slice
    patch = (96, 112)
    ours_img, ours_lab = rotate_scale_window(image, label, top_left, patch, angle, scale)
    grid = window_grid(image.shape[1:], top_left, patch, angle, scale)
    transform = _nnunet_spatial(patch)
    their_img = transform._apply_to_image(image.clone(), grid=grid)
    their_lab = transform._apply_to_segmentation(label.clone(), grid=grid)
    their_lab[their_lab == -1] = 0                                   # nnU-Net's RemoveLabelTansform(-1, 0)
    torch.testing.assert_close(ours_img, their_img, atol=1e-3, rtol=1e-5)   # bilinear, zeros outside
    # one-hot bilinear + argmax: equal except where two labels tie within batchgeneratorsv2's float16 scores
    assert (ours_lab != their_lab).float().mean() < 2e-3
    assert ours_lab.dtype == label.dtype


def test_label_argmax_is_not_nearest_neighbour(ct_slice):
    """A scaled window: one-hot + argmax smooths label boundaries, nearest neighbour (the old path) does not."""
    image, label = ct_slice
    grid = window_grid(image.shape[1:], (40, 40), (64, 64), 0.3, 0.8)
    nearest = torch.nn.functional.grid_sample(label[None].float(), grid[None], mode="nearest", align_corners=False)[0]
    assert not torch.equal(resample_labels(label, grid), nearest.to(label.dtype))


def test_lowres_matches_batchgeneratorsv2_and_is_off_in_the_paper_recipe(ct_slice, tmp_path):
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform

    image, _ = ct_slice
    transform = SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                               ignore_axes=None, allowed_channels=None, p_per_channel=0.5)
    theirs = transform._apply_to_image(image.clone(), apply_to_channel=[0], scales=torch.tensor([[0.63, 0.63]]))
    torch.testing.assert_close(simulate_lowres(image[0], 0.63), theirs[0])
    (tmp_path / "Dataset1_X").mkdir()
    cfg = load_config(str(tmp_path / "Dataset1_X"), "primus")
    assert cfg.augment.lowres_p == 0.0
