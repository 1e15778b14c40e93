"""finetune.metrics against independent computations on crafted masks (brute-force distances, analytic shapes)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from finetune.metrics import (build_summary, dice, evaluate_case, evaluation_classes, format_table, hd95, nsd, summarize,
                              write_per_case_csv, write_summary_json)


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
    assert "nsd_boundary" in summary["mean"] and "nsd" not in summary["mean"]    # the NSD names its definition
    table = format_table({"tiny": summary})
    assert "DSC (%)" in table and "NSD (%)" in table and " 50.00" in table
    regions = {"kidney_and_masses": [1, 2], "masses": [2]}
    out = evaluate_case(pred1, gt1, (1, 1, 1), regions)
    assert out["kidney_and_masses"]["gt_voxels"] == int((gt1 > 0).sum())


def _kits_like_cases():
    """Two KiTS-like cases (1 kidney, 2 tumour, 3 cyst): the second has no cyst but a false-positive cyst voxel."""
    gt1 = np.zeros((6, 12, 12), np.uint8)
    gt1[1:5, 1:9, 1:9] = 1
    gt1[2:4, 2:5, 2:5] = 2
    gt1[2:4, 6:8, 6:8] = 3
    pred1 = gt1.copy()
    pred1[2:4, 6:8, 6:8] = 2                                  # the cyst called tumour
    gt2 = np.zeros_like(gt1)
    gt2[1:5, 3:10, 3:10] = 1
    gt2[2:4, 4:6, 4:6] = 2
    pred2 = gt2.copy()
    pred2[0, 0, 0] = 3
    return {"case_1": (pred1, gt1), "case_2": (pred2, gt2)}


def test_summary_keeps_paper_convention_and_nnunet_layout_and_regions(tmp_path):
    labels = ["background", "kidney", "tumour", "cyst"]
    classes = evaluation_classes(labels)
    assert classes == {"kidney": [1], "tumour": [2], "cyst": [3]}          # per label, as the MedDINOv3 script
    regions = {"kidney_and_masses": [1, 2, 3], "masses": [2, 3], "tumour": [2]}
    cases = _kits_like_cases()
    per_case = {c: evaluate_case(p, g, (2.0, 1.0, 1.0), classes) for c, (p, g) in cases.items()}
    region_cases = {c: evaluate_case(p, g, (2.0, 1.0, 1.0), regions) for c, (p, g) in cases.items()}
    files = {c: (f"ref/{c}.nii.gz", f"pred/{c}.nii.gz") for c in cases}
    summary = build_summary(per_case, classes, files, region_cases, regions)
    # paper convention: case_2 has no cyst -> left out of the cyst mean (cyst fully missed in case_1 -> 0)
    assert summary["per_class"]["cyst"]["dice"] == 0.0 and summary["per_class"]["cyst"]["n_cases"] == 1
    # nnU-Net convention: case_2's false-positive cyst counts Dice 0, case_1 Dice 0 -> 0; kidney differs by case
    assert summary["mean"]["3"]["Dice"] == 0.0 and summary["mean"]["3"]["n_pred"] == pytest.approx(0.5)
    assert summary["mean"]["1"]["Dice"] == pytest.approx(summary["per_class"]["kidney"]["dice"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean([summary["mean"][k]["Dice"] for k in "123"]))
    assert summary["paper_mean"]["dice"] == pytest.approx(np.mean([summary["per_class"][c]["dice"] for c in classes]))
    assert "nsd_boundary" in summary["paper_mean"] and "NSD_boundary" in summary["mean"]["1"]
    assert summary["nsd_definition"]["method"] == "boundary"
    # the hierarchical regions, both conventions, with nnU-Net's region keys
    assert set(summary["regions"]["per_class"]) == set(regions)
    assert set(summary["regions"]["mean"]) == {"(1, 2, 3)", "(2, 3)", "2"}
    assert summary["regions"]["per_class"]["masses"]["dice"] == pytest.approx(
        np.mean([dice(np.isin(p, [2, 3]), np.isin(g, [2, 3])) for p, g in cases.values()]))
    write_summary_json(summary, tmp_path / "summary.json")
    write_per_case_csv(per_case, tmp_path / "per_case.csv")
    assert (tmp_path / "per_case.csv").read_text().splitlines()[0].split(",")[3] == "nsd_boundary"


def test_nnunet_layout_matches_nnunet_own_evaluation(tmp_path):
    """nnU-Net v2's own ``compute_metrics`` on the same NIfTI files gives our per-case counts and Dice, and its
    ``load_summary_json`` reads our summary.json (label and region keys)."""
    import nibabel as nib
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics, load_summary_json
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    labels = ["background", "kidney", "tumour", "cyst"]
    classes = evaluation_classes(labels)
    regions = {"kidney_and_masses": [1, 2, 3], "masses": [2, 3]}
    cases = _kits_like_cases()
    files, per_case, region_cases = {}, {}, {}
    for case_id, (pred, gt) in cases.items():
        paths = []
        for kind, arr in (("ref", gt), ("pred", pred)):
            path = tmp_path / kind / f"{case_id}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
            paths.append(str(path))
        files[case_id] = tuple(paths)
        per_case[case_id] = evaluate_case(pred, gt, (2.0, 1.0, 1.0), classes)
        region_cases[case_id] = evaluate_case(pred, gt, (2.0, 1.0, 1.0), regions)
        theirs = compute_metrics(*paths, SimpleITKIO(), [1, 2, 3, (1, 2, 3), (2, 3)])["metrics"]
        for name, ids in {**classes, **regions}.items():
            ours = (per_case if len(ids) == 1 else region_cases)[case_id][name]
            key = ids[0] if len(ids) == 1 else tuple(ids)
            assert [ours[k] for k in ("tp", "fp", "fn", "tn")] == [theirs[key][k] for k in ("TP", "FP", "FN", "TN")]
            assert ours["dice"] == pytest.approx(theirs[key]["Dice"], nan_ok=True)
    summary = build_summary(per_case, classes, files, region_cases, regions)
    write_summary_json(summary, tmp_path / "summary.json")
    loaded = load_summary_json(str(tmp_path / "summary.json"))
    assert set(loaded["mean"]) == {1, 2, 3}
    assert loaded["metric_per_case"][0]["metrics"][1]["TP"] == per_case["case_1"]["kidney"]["tp"]
    assert loaded["foreground_mean"]["Dice"] == pytest.approx(summary["foreground_mean"]["Dice"])


def test_compare_cli_puts_our_numbers_next_to_the_papers(tmp_path, capsys):
    """``python -m finetune.metrics compare RUN ... --out table2.md`` (slurm/reproduce.sh's last job)."""
    from finetune.metrics import main

    labels = ["background", "kidney", "tumour", "cyst"]
    classes = evaluation_classes(labels)
    cases = _kits_like_cases()
    per_case = {c: evaluate_case(p, g, (2.0, 1.0, 1.0), classes) for c, (p, g) in cases.items()}
    summary = build_summary(per_case, classes, {c: ("r", "p") for c in cases})
    write_summary_json(summary, tmp_path / "kits" / "summary.json", {"task": "kits23", "fold": "0"})
    table = main(["compare", str(tmp_path / "kits"), "--out", str(tmp_path / "table2.md")])
    row = next(line for line in table.splitlines() if "kits23" in line)
    assert f"| KiTS23 (kits23) | 0 | {100 * summary['paper_mean']['dice']:.2f} | 70.68 |" in row
    assert "62.67" in row and (tmp_path / "table2.md").read_text().strip() == table
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        main(["compare", str(tmp_path / "missing")])
