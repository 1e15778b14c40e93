"""Whole-volume inference (``finetune.infer``) on the real MSD spleen CT: the sliding-window settings come from the
config and the plans, 2.5-D context stacks, test-time mirroring, Gaussian-blended windows, logits (not
probabilities) stored in float16, streamed back to the original grid."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from finetune.config import load_config
from finetune.heads import HeadRecipe, get_recipe
from finetune.infer import (SlidingWindow, context_stack, iter_slicewise_logits, mirrored_logits, predict_case,
                            predict_volume_slicewise)
from finetune.preprocess import Plans, preprocess_volume, read_volume, restore_geometry

LABELS = ["background", "a", "b"]


def _setup(tmp_path: Path, real_data: Path, *overrides: str):
    (tmp_path / "Dataset1_X").mkdir(exist_ok=True)
    cfg = load_config(str(tmp_path / "Dataset1_X"), "primus", ["tiny.yaml"], ["infer.batch_size=3", *overrides])
    torch.manual_seed(0)
    model = get_recipe("primus").build_model(cfg, len(LABELS)).eval()
    image = read_volume(real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz")
    plans = Plans(target_spacing_yx=[3.0, 3.5], clip_low=-160, clip_high=240, mean=60, std=50, labels=LABELS,
                  patch_size=[int(p) for p in cfg.data.patch_size])
    return cfg, model, image, plans


@pytest.fixture(scope="module")
def spleen_volume(real_data: Path) -> torch.Tensor:
    """The real CT, preprocessed at its own spacing: ``[26, 166, 164]`` float32."""
    image = read_volume(real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz")
    plans = Plans(target_spacing_yx=list(image.spacing_zyx[1:]), clip_low=-160, clip_high=240, mean=60, std=50,
                  labels=LABELS, patch_size=[64, 64])
    return torch.from_numpy(preprocess_volume(image, plans)[0])


def test_window_settings_come_from_the_config_and_the_plans(tmp_path, real_data):
    cfg, _, _, plans = _setup(tmp_path, real_data, "data.context_slices=2", "infer.step=0.25")
    plans = dataclasses.replace(plans, patch_size=[48, 40])   # the plans, not data.patch_size, name the window
    window = SlidingWindow.from_config(cfg, plans)
    assert window == SlidingWindow(patch_size=(48, 40), context_slices=2, step=0.25, gaussian_sigma_scale=0.125,
                                   mirror=False, batch_size=3, precision="fp32")


def test_context_stack_replicates_the_edge_slices(spleen_volume):
    z = torch.tensor([0, 12, 25])
    stack = context_stack(spleen_volume, z, 2)
    assert stack.shape == (3, 5, *spleen_volume.shape[1:])
    torch.testing.assert_close(stack[:, 2], spleen_volume[z])                  # the centre channel is the slice
    torch.testing.assert_close(stack[1], spleen_volume[10:15])                 # neighbours in order
    for k in (0, 1):                                                           # below slice 0: slice 0 again
        torch.testing.assert_close(stack[0, k], spleen_volume[0])
        torch.testing.assert_close(stack[2, 4 - k], spleen_volume[25])


class _Ramp(nn.Module):
    """Not flip-equivariant: 2 class maps = the image and the image plus a left-to-right, top-to-bottom ramp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ramp = torch.linspace(0, 1, w)[None, :] + 2 * torch.linspace(0, 1, h)[:, None]
        return torch.cat([x[:, :1], x[:, :1] + ramp], 1)


def test_mirroring_averages_the_four_flips(spleen_volume):
    x = spleen_volume[10:12, None]                                             # [2, 1, Y, X]
    model = _Ramp()
    assert torch.equal(mirrored_logits(model, x, mirror=False), model(x))
    expected = torch.stack([torch.flip(model(torch.flip(x, axes)), axes) if axes else model(x)
                            for r in range(3) for axes in itertools.combinations((-2, -1), r)]).mean(0)
    torch.testing.assert_close(mirrored_logits(model, x, mirror=True), expected)
    # each flipped ramp is undone, so the mirrored prediction sees the mean ramp: 1.5 everywhere
    torch.testing.assert_close(mirrored_logits(model, x, True)[:, 1] - x[:, 0], torch.full_like(x[:, 0], 1.5))


def test_gaussian_windows_of_a_pointwise_model_give_its_whole_slice_output(spleen_volume):
    """Overlapping windows are blended with normalised Gaussian weights: for a model that maps every pixel on its
    own, any window layout (here 32 x 24 windows over 90 x 70 slices, mirrored) gives the whole-slice output."""
    torch.manual_seed(0)
    volume = spleen_volume[8:15, 40:130, 50:120].contiguous()                  # [7, 90, 70] through the spleen
    model = nn.Conv2d(3, 4, kernel_size=1).eval()                              # context 1 -> 3 input channels
    window = SlidingWindow((32, 24), context_slices=1, step=0.5, gaussian_sigma_scale=0.125, mirror=True,
                           batch_size=4, precision="fp32")
    chunks = list(iter_slicewise_logits(model, volume, window, slices_per_batch=3))
    assert [z0 for z0, _ in chunks] == [0, 3, 6]
    assert [c.shape for _, c in chunks] == [(4, 3, 90, 70), (4, 3, 90, 70), (4, 1, 90, 70)]
    with torch.no_grad():
        reference = model(context_stack(volume, torch.arange(7), 1)).permute(1, 0, 2, 3)
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1), reference, atol=1e-4, rtol=1e-4)
    whole = predict_volume_slicewise(model, volume, window)
    assert whole.dtype == torch.float16 and whole.shape == (4, 7, 90, 70)
    torch.testing.assert_close(whole.float(), reference, atol=2e-2, rtol=2e-3)


def test_slicewise_prediction_is_float16_logits(tmp_path, real_data):
    cfg, model, image, plans = _setup(tmp_path, real_data)
    arr, _, _ = preprocess_volume(image, plans)
    volume = torch.from_numpy(arr)
    window = SlidingWindow.from_config(cfg, plans)
    logits = predict_volume_slicewise(model, volume, window)
    assert logits.dtype == torch.float16 and logits.shape == (3, *arr.shape)
    assert not torch.allclose(logits.float().sum(0), torch.ones(arr.shape), atol=1e-2)   # not probabilities
    chunks = list(iter_slicewise_logits(model, volume, window))
    assert [z0 for z0, _ in chunks] == list(range(0, arr.shape[0], 3))
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1).half(), logits)


def test_streamed_prediction_equals_whole_volume_restore(tmp_path, real_data):
    cfg, model, image, plans = _setup(tmp_path, real_data)
    recipe = get_recipe("primus")
    assert recipe.streams_slices and not get_recipe("mvr").streams_slices
    streamed = predict_case(model, recipe, image, plans, cfg, torch.device("cpu"))
    arr, _, props = preprocess_volume(image, plans)
    window = SlidingWindow.from_config(cfg, plans)
    whole = restore_geometry(torch.cat([c for _, c in iter_slicewise_logits(model, torch.from_numpy(arr), window)], 1),
                             props)
    assert streamed.shape == image.array.shape and streamed.dtype == np.uint8
    np.testing.assert_array_equal(streamed, whole)


def test_whole_volume_heads_are_restored_and_checked(tmp_path, real_data):
    """A head with its own ``predict_volume`` gets the config and the plans; its logits are restored to the
    original grid, and logits of the wrong shape are a clear error naming the head."""
    cfg, model, image, plans = _setup(tmp_path, real_data)
    seen = {}

    def whole_volume(net, volume, cfg_, plans_):
        seen.update(plans=plans_, shape=tuple(volume.shape))
        return predict_volume_slicewise(net, volume, SlidingWindow.from_config(cfg_, plans_))

    recipe = HeadRecipe(name="whole", build_model=get_recipe("primus").build_model, predict_volume=whole_volume)
    assert not recipe.streams_slices
    labels = predict_case(model, recipe, image, plans, cfg, torch.device("cpu"))
    assert seen["plans"] is plans and seen["shape"] == preprocess_volume(image, plans)[0].shape
    streamed = predict_case(model, get_recipe("primus"), image, plans, cfg, torch.device("cpu"))
    assert labels.shape == image.array.shape and (labels == streamed).mean() > 0.99   # float16 vs float32 ties
    broken = HeadRecipe(name="broken", build_model=recipe.build_model,
                        predict_volume=lambda net, volume, c, p: torch.zeros(2, *volume.shape))
    with pytest.raises(ValueError, match=r"^head broken: predict_volume returned \(2, 26, "):
        predict_case(model, broken, image, plans, cfg, torch.device("cpu"))
