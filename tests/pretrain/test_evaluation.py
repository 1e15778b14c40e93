"""pretrain.evaluation: feature-health measures and the linear probe against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import entropy
from sklearn.metrics.pairwise import cosine_similarity

from pretrain import evaluation as ev
from pretrain.visualize.inputs import load_axial_slice


def test_effective_rank_matches_numpy_rankme():
    x = np.random.default_rng(0).normal(size=(50, 12))
    s = np.linalg.svd(x, compute_uv=False)
    expected = float(np.exp(entropy(s / s.sum())))
    assert ev.effective_rank(x) == pytest.approx(expected, rel=1e-6)


def test_effective_rank_extremes():
    v = np.random.default_rng(1).normal(size=(1, 8))
    collapsed = np.repeat(v, 20, axis=0) * np.arange(1, 21)[:, None]  # every row parallel
    assert ev.effective_rank(collapsed) == pytest.approx(1.0, abs=1e-3)
    assert ev.effective_rank(np.eye(10)) == pytest.approx(10.0, rel=1e-6)


def test_mean_pairwise_cosine_matches_bruteforce():
    x = np.random.default_rng(2).normal(size=(30, 7)) + 0.5
    c = cosine_similarity(x)
    expected = (c.sum() - np.trace(c)) / (30 * 29)
    assert ev.mean_pairwise_cosine(x) == pytest.approx(expected, rel=1e-9)
    assert ev.mean_pairwise_cosine(np.ones((5, 3))) == pytest.approx(1.0)
    assert ev.mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0, abs=1e-12)


def test_sample_rows_is_seeded_subset():
    x = torch.arange(100.0).reshape(50, 2)
    a, b = ev.sample_rows(x, 10, seed=3), ev.sample_rows(x, 10, seed=3)
    assert torch.equal(a, b) and a.shape == (10, 2)
    assert len({tuple(r.tolist()) for r in a}) == 10
    assert ev.sample_rows(x, 60, seed=0) is x


def test_split_slices_alternating_blocks():
    train, test = ev.split_slices(26, 4)
    assert sorted(train + test) == list(range(26)) and not set(train) & set(test)
    assert train[:5] == [0, 1, 2, 3, 8] and test[:5] == [4, 5, 6, 7, 12]
    with pytest.raises(ValueError):
        ev.split_slices(5, 4)


def test_linear_probe_recovers_linearly_separable_labels():
    """Patch features that encode the class linearly -> the probe segments held-out maps almost perfectly."""
    g = torch.Generator().manual_seed(0)
    patch_classes = torch.randint(0, 3, (6, 8, 8), generator=g)
    proto = torch.randn(3, 16, generator=g) * 3
    feats = proto[patch_classes] + 0.1 * torch.randn(6, 8, 8, 16, generator=g)
    labels = patch_classes.repeat_interleave(4, 1).repeat_interleave(4, 2)  # [6, 32, 32], 4x4 pixels per patch
    probe = ev.fit_linear_probe(feats[:4], labels[:4], 3, steps=200, lr=0.05, weight_decay=0.0)
    pred = ev.predict_probe(probe, feats[4:], (32, 32))
    # bilinear upsampling blurs class borders by up to half a patch; interior pixels must be right
    assert (pred == labels[4:]).float().mean() > 0.85
    assert np.isfinite(probe.final_loss)
    again = ev.fit_linear_probe(feats[:4], labels[:4], 3, steps=200, lr=0.05, weight_decay=0.0)
    assert torch.equal(again.weight, probe.weight)  # deterministic


def test_volume_slices_orientation_matches_visualize(sample_ct):
    """Slices come out in the display/CT-3M orientation: compare with pretrain.visualize's independent reader."""
    img = sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz"
    vol = ev.volume_slices(str(img), str(sample_ct / "msd_spleen" / "sub-spleen2_ct_seg-manual.nii.gz"))
    ref = load_axial_slice(img, 13, -500)
    np.testing.assert_array_equal(vol.hu[13], ref.hu)
    assert vol.labels.shape == vol.hu.shape and set(np.unique(vol.labels)) == {0, 1}


def test_volume_slices_rejects_mismatched_labels(sample_ct):
    with pytest.raises(ValueError, match="does not match"):
        ev.volume_slices(str(sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz"),
                         str(sample_ct / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))


def test_series_summary_and_improved():
    v = np.arange(11.0)
    assert ev.series_summary(v, 5) == [0.0, 2.0, 5.0, 8.0, 10.0]
    assert ev.improved(v, 3) == (1.0, 9.0)
    with pytest.raises(ValueError):
        ev.improved(v, 6)
