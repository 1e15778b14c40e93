"""Slice-wise inference: logits (not probabilities) out, stored in float16, streamed back to the original grid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from finetune.config import load_config
from finetune.heads import get_recipe
from finetune.infer import iter_slicewise_logits, predict_case, predict_volume_slicewise
from finetune.preprocess import Plans, preprocess_volume, read_volume, restore_geometry


def _setup(tmp_path: Path, real_data: Path):
    (tmp_path / "Dataset1_X").mkdir()
    cfg = load_config(str(tmp_path / "Dataset1_X"), "primus", ["tiny.yaml"], ["infer.batch_size=3"])
    cfg.task.class_names = ["background", "a", "b"]
    torch.manual_seed(0)
    model = get_recipe("primus").build_model(cfg, 3).eval()
    image = read_volume(real_data / "ivadomed_msd_spleen" / "sub-spleen2_ct.nii.gz")
    plans = Plans(target_spacing_yx=[3.0, 3.5], clip_low=-160, clip_high=240, mean=60, std=50,
                  labels=list(cfg.task.class_names))
    return cfg, model, image, plans


def test_slicewise_prediction_is_float16_logits(tmp_path, real_data):
    cfg, model, image, plans = _setup(tmp_path, real_data)
    arr, _, _ = preprocess_volume(image, plans)
    volume = torch.from_numpy(arr)
    logits = predict_volume_slicewise(model, volume, cfg)
    assert logits.dtype == torch.float16 and logits.shape == (3, *arr.shape)
    assert not torch.allclose(logits.float().sum(0), torch.ones(arr.shape), atol=1e-2)   # not probabilities
    chunks = list(iter_slicewise_logits(model, volume, cfg))
    assert [z0 for z0, _ in chunks] == list(range(0, arr.shape[0], 3))
    torch.testing.assert_close(torch.cat([c for _, c in chunks], 1).half(), logits)


def test_streamed_prediction_equals_whole_volume_restore(tmp_path, real_data):
    cfg, model, image, plans = _setup(tmp_path, real_data)
    recipe = get_recipe("primus")
    assert recipe.streams_slices and not get_recipe("mvr").streams_slices
    streamed = predict_case(model, recipe, image, plans, cfg, torch.device("cpu"))
    arr, _, props = preprocess_volume(image, plans)
    whole = restore_geometry(torch.cat([c for _, c in iter_slicewise_logits(model, torch.from_numpy(arr), cfg)], 1),
                             props)
    assert streamed.shape == image.array.shape and streamed.dtype == np.uint8
    np.testing.assert_array_equal(streamed, whole)
