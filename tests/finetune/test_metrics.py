"""finetune.metrics against independent computations on crafted masks (brute-force distances, analytic shapes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from finetune.metrics import dice, evaluate_case, evaluation_classes, format_table, hd95, nsd, summarize


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels by explicit face-neighbour checks (array edge = outside), written independently."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(mask & ~inner)


def _brute_distances(pred, gt, spacing):
    bp, bg = _brute_boundary(pred) * spacing, _brute_boundary(gt) * spacing
    d = cdist(bp, bg)
    return d.min(1), d.min(0)


def _sphere(shape, center_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center_mm)) <= radius_mm ** 2


def test_dice_known_values_and_empty():
    a = _box((10, 10, 10), (2, 2, 2), (6, 6, 6))          # 64 voxels
    b = _box((10, 10, 10), (4, 2, 2), (8, 6, 6))          # 64 voxels, overlap 32
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    empty = np.zeros_like(a)
    assert math.isnan(dice(empty, empty))
    assert dice(a, empty) == 0.0 and dice(empty, a) == 0.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (2.0, 1.0, 0.5)])
def test_boundary_nsd_and_hd95_match_brute_force(spacing):
    rng = np.random.default_rng(0)
    shape = (14, 16, 15)
    gt = _box(shape, (3, 4, 3), (10, 12, 11))
    pred = _box(shape, (4, 3, 5), (12, 11, 12))
    pred[6, 6, 6] = False                                  # an interior hole adds boundary voxels
    pred |= rng.random(shape) > 0.97                       # speckle
    d_pg, d_gp = _brute_distances(pred, gt, np.array(spacing))
    for tol in (0.5, 1.0, 2.0, 3.5):
        expected = ((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (d_pg.size + d_gp.size)
        assert nsd(pred, gt, spacing, tol, "boundary") == pytest.approx(expected, abs=1e-12)
    assert hd95(pred, gt, spacing) == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def test_shifted_box_exact_surface_distances():
    # a box shifted by 2 voxels along z at 3 mm: the two z-faces are 6 mm from their counterparts
    spacing = (3.0, 1.0, 1.0)
    gt = _box((20, 20, 20), (4, 5, 5), (10, 15, 15))
    pred = _box((20, 20, 20), (6, 5, 5), (12, 15, 15))
    assert hd95(pred, gt, spacing) == pytest.approx(6.0)
    assert nsd(pred, gt, spacing, 6.0, "boundary") == 1.0
    assert nsd(pred, gt, spacing, 6.0, "surface") == 1.0
    assert nsd(pred, gt, spacing, 1.0, "boundary") < 1.0


@pytest.mark.parametrize("method", ["boundary", "surface"])
def test_concentric_spheres_nsd_and_hd95(method):
    # GT radius 10 mm, prediction radius 13 mm: every surface point is ~3 mm from the other surface
    spacing = (1.5, 1.0, 0.75)
    shape = (24, 34, 46)
    center = (17.0, 17.0, 17.0)
    gt = _sphere(shape, center, 10.0, spacing)
    pred = _sphere(shape, center, 13.0, spacing)
    assert nsd(pred, gt, spacing, 1.0, method) < 0.05
    assert nsd(pred, gt, spacing, 5.0, method) == 1.0
    assert nsd(gt, gt, spacing, 0.0, method) == 1.0
    assert 2.0 <= hd95(pred, gt, spacing) <= 4.5


def _chamfered_box_area(size_mm, spacing):
    """Area of the marching-cubes surface of a binary box: faces through the half-voxel boundary, minus the
    45-degree chamfer each edge gets (two half-voxel strips replaced by their hypotenuse); corners neglected."""
    area = 2 * (size_mm[0] * size_mm[1] + size_mm[1] * size_mm[2] + size_mm[0] * size_mm[2])
    for axis in range(3):
        a, b = [spacing[i] / 2 for i in range(3) if i != axis]
        area -= 4 * size_mm[axis] * (a + b - math.hypot(a, b))
    return area


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_surfel_areas_of_a_box_match_geometry(spacing):
    from finetune.metrics import _surfels, _union_crop

    box = _box((30, 30, 30), (5, 5, 5), (25, 15, 10))
    p, g = _union_crop(box, box)
    edge, _, area, _ = _surfels(p, g, spacing)
    size_mm = [n * s for n, s in zip((20, 10, 5), spacing)]
    assert area[edge].sum() == pytest.approx(_chamfered_box_area(size_mm, spacing), rel=5e-3)
    sphere = _sphere((40, 40, 40), (20.0, 20.0, 20.0), 15.0, (1.0, 1.0, 1.0))
    p, g = _union_crop(sphere, sphere)
    edge, _, area, _ = _surfels(p, g, (1.0, 1.0, 1.0))
    assert area[edge].sum() == pytest.approx(4 * math.pi * 15.0 ** 2, rel=0.12)  # binary-sphere facets, not smooth


def test_empty_masks_are_nan_or_zero():
    full = _box((8, 8, 8), (2, 2, 2), (5, 5, 5))
    empty = np.zeros_like(full)
    for method in ("boundary", "surface"):
        assert math.isnan(nsd(empty, empty, (1, 1, 1), 1.0, method))
        assert nsd(full, empty, (1, 1, 1), 1.0, method) == 0.0
        assert nsd(empty, full, (1, 1, 1), 1.0, method) == 0.0
    assert math.isnan(hd95(full, empty, (1, 1, 1)))
    assert math.isnan(hd95(empty, empty, (1, 1, 1)))
    with pytest.raises(ValueError, match="method"):
        nsd(full, full, (1, 1, 1), 1.0, "voxels")
    with pytest.raises(ValueError, match="spacing"):
        nsd(full, full, (1, 1), 1.0)
    with pytest.raises(ValueError, match="shape"):
        dice(full, full[:-1])


def test_2d_masks_supported():
    gt = _box((30, 30), (5, 5), (20, 20))
    pred = _box((30, 30), (5, 7), (20, 22))
    d_pg, d_gp = _brute_distances(pred, gt, np.array([0.5, 0.5]))
    assert nsd(pred, gt, (0.5, 0.5), 0.5, "boundary") == pytest.approx(
        ((d_pg <= 0.5).sum() + (d_gp <= 0.5).sum()) / (d_pg.size + d_gp.size))
    assert 0 < nsd(pred, gt, (0.5, 0.5), 0.5, "surface") < 1


def test_evaluation_excludes_absent_classes_and_means_over_cases_then_classes():
    labels = ["background", "spleen", "liver"]
    classes = evaluation_classes(labels)
    assert classes == {"spleen": [1], "liver": [2]}
    gt1 = np.zeros((6, 10, 10), int)
    gt1[1:4, 1:5, 1:5] = 1
    gt1[1:4, 6:9, 6:9] = 2
    pred1 = gt1.copy()
    pred1[1:4, 6:9, 6:9] = 0                               # liver missed in case 1
    gt2 = np.zeros_like(gt1)
    gt2[2:5, 2:6, 2:6] = 1                                  # no liver in case 2
    pred2 = gt2.copy()
    pred2[0, 0, 0] = 2                                      # a false-positive liver voxel
    per_case = {"c1": evaluate_case(pred1, gt1, (1, 1, 1), classes), "c2": evaluate_case(pred2, gt2, (1, 1, 1), classes)}
    assert not per_case["c2"]["liver"]["gt_present"]
    summary = summarize(per_case)
    assert summary["per_class"]["spleen"]["dice"] == 1.0
    assert summary["per_class"]["liver"]["dice"] == 0.0                 # only case 1 counts
    assert summary["per_class"]["liver"]["n_cases"] == 1
    assert summary["per_class"]["liver"]["n_absent_in_gt"] == 1
    assert summary["per_class"]["liver"]["n_false_positive_when_absent"] == 1
    assert summary["mean"]["dice"] == pytest.approx(0.5)
    table = format_table({"tiny": summary})
    assert "DSC (%)" in table and "NSD (%)" in table and " 50.00" in table
    regions = evaluation_classes(labels, {"kidney_and_masses": [1, 2], "masses": [2]})
    out = evaluate_case(pred1, gt1, (1, 1, 1), regions)
    assert out["kidney_and_masses"]["gt_voxels"] == int((gt1 > 0).sum())
