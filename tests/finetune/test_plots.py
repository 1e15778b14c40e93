"""finetune.plots on real CT: affine alignment, slice choice, overlays, per-class score bars, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from finetune import plots


@pytest.fixture(scope="module")
def spleen(real_data: Path) -> dict[str, Path]:
    folder = real_data / "ivadomed_msd_spleen"
    return {"image": folder / "sub-spleen2_ct.nii.gz", "gt": folder / "sub-spleen2_ct_seg-manual.nii.gz"}


@pytest.fixture(scope="module")
def cfg():
    return plots.load_config()


def _png(path: Path) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size, np.asarray(im.convert("RGB"), dtype=np.float32)


def _cropped_flipped_prediction(gt_path: Path, out: Path) -> np.ndarray:
    """A 'prediction' (dilated manual mask) stored cropped and in LAS orientation: same anatomy, other grid.

    Returns the expected prediction on the image grid (zero outside the crop).
    """
    gt = nib.load(gt_path)
    mask = ndimage.binary_dilation(np.asanyarray(gt.dataobj) > 0, iterations=2).astype(np.uint8)
    lo, hi = np.array([20, 10, 3]), np.array([150, 160, 24])
    crop = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = gt.affine.copy()
    affine[:3, 3] = gt.affine[:3, :3] @ lo + gt.affine[:3, 3]
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = affine[:3, :3] @ np.array([crop.shape[0] - 1, 0, 0]) + affine[:3, 3]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(crop[::-1]), flipped), out)
    expected = np.zeros_like(mask)
    expected[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = crop
    return expected


def test_labels_are_aligned_by_affine_not_by_array(tmp_path: Path, spleen) -> None:
    pred_path = tmp_path / "pred_las.nii.gz"
    expected = _cropped_flipped_prediction(spleen["gt"], pred_path)
    assert nib.aff2axcodes(nib.load(pred_path).affine) == ("L", "A", "S")
    hu, gt, pred, spacing = plots.load_case(spleen["image"], spleen["gt"], pred_path)
    assert hu.shape == gt.shape == pred.shape == (164, 166, 26)
    assert np.array_equal(gt, np.asanyarray(nib.load(spleen["gt"]).dataobj))
    assert np.array_equal(pred, expected)
    assert spacing == pytest.approx((0.794922, 0.794922), abs=1e-5)


def test_labels_outside_the_image_are_rejected(tmp_path: Path, spleen) -> None:
    gt = nib.load(spleen["gt"])
    far = gt.affine.copy()
    far[:3, 3] += 1000.0
    path = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(gt.dataobj)[:, :, :5], far), path)
    with pytest.raises(ValueError, match="far.nii.gz: labels do not overlap"):
        plots.load_case(spleen["image"], path, None)


def test_choose_slices_spreads_over_labelled_range(spleen) -> None:
    _, gt, _, _ = plots.load_case(spleen["image"], spleen["gt"], None)
    area = (gt > 0).sum(axis=(0, 1))
    chosen = plots.choose_slices(gt, None, 3, gt.shape[2])
    assert len(chosen) == 3 and chosen == sorted(set(chosen))
    assert all(area[z] > 0 for z in chosen)
    assert int(np.argmax(area)) in chosen
    assert plots.choose_slices(None, None, 2, 30) == [10, 19]


def test_slice_dice() -> None:
    a = np.zeros((10, 10), int)
    b = np.zeros((10, 10), int)
    a[2:6, 2:6] = 1
    b[2:6, 4:8] = 1
    assert plots.slice_dice(a, b) == pytest.approx(0.5)
    assert np.isnan(plots.slice_dice(a * 0, b * 0))


def test_overlays_png(tmp_path: Path, spleen, cfg) -> None:
    pred_path = tmp_path / "pred.nii.gz"
    _cropped_flipped_prediction(spleen["gt"], pred_path)
    out = tmp_path / "overlay.png"
    plots.plot_case_overlays(spleen["image"], spleen["gt"], pred_path, out, {1: "spleen"}, n_slices=2, cfg=cfg)
    size, pixels = _png(out)
    panel, dpi = cfg.panel_size_in, cfg.dpi
    assert size == (round(panel * 3 * dpi), round((panel * 2 + 0.6) * dpi))
    assert pixels.std() > 20
    # the label colour (tab20 class 1, blue) is present: the overlay was drawn
    blueish = (pixels[..., 2] > pixels[..., 0] + 40) & (pixels[..., 2] > 100)
    assert blueish.mean() > 0.02


def _summary(path: Path) -> None:
    path.write_text(json.dumps({
        "task": "msd_spleen", "head": "primus",
        "per_class": {"spleen": {"dice": 0.91, "nsd": 0.83, "hd95": 4.0}, "liver": {"Dice": 0.95, "NSD": 0.7}},
    }))


def test_per_class_scores_and_spread(tmp_path: Path) -> None:
    _summary(tmp_path / "summary.json")
    scores = plots.per_class_scores(json.loads((tmp_path / "summary.json").read_text()), ["dice", "nsd"])
    assert scores == {"dice": {"spleen": 0.91, "liver": 0.95}, "nsd": {"spleen": 0.83, "liver": 0.7}}
    nnunet_style = {"mean": {"1": {"Dice": 0.8, "IoU": 0.7}}, "foreground_mean": {"Dice": 0.8}}
    assert plots.per_class_scores(nnunet_style, ["dice"]) == {"dice": {"1": 0.8}}
    with pytest.raises(ValueError, match="per-class"):
        plots.per_class_scores({"mean_dice": 0.9}, ["dice"])
    (tmp_path / "rows.csv").write_text("case_id,class,dice,nsd_boundary\na,spleen,0.8,0.7\nb,spleen,1.0,0.9\n"
                                       "c,spleen,,0.8\n")
    spread = plots.per_case_spread(tmp_path / "rows.csv", ["dice", "nsd"])
    assert spread["dice"]["spleen"] == pytest.approx(0.1) and spread["nsd"]["spleen"] == pytest.approx(np.std([0.7, 0.9, 0.8]))
    (tmp_path / "wide.csv").write_text("case,spleen_dice,spleen_nsd\na,0.8,0.7\nb,1.0,0.9\n")
    with pytest.raises(ValueError, match=r"wide.csv: no 'class' column"):   # only finetune's per_case.csv layout
        plots.per_case_spread(tmp_path / "wide.csv", ["dice"])
    (tmp_path / "long.csv").write_text("case,class,dice,nsd\na,spleen,0.8,0.7\nb,spleen,1.0,0.9\n")
    assert plots.per_case_spread(tmp_path / "long.csv", ["dice"])["dice"]["spleen"] == pytest.approx(0.1)


def test_bars_cli(tmp_path: Path, cfg, capsys) -> None:
    _summary(tmp_path / "summary.json")
    (tmp_path / "cases.csv").write_text("case_id,class,dice\na,spleen,0.8\nb,spleen,1.0\na,liver,0.9\nb,liver,1.0\n")
    out = tmp_path / "plots" / "scores.png"
    assert plots.main(["bars", "--summary", str(tmp_path / "summary.json"), "--per-case",
                       str(tmp_path / "cases.csv"), "--out", str(out)]) == 0
    size, pixels = _png(out)
    assert size == (round(cfg.panel_size_in * 1.5 * cfg.dpi), round(cfg.panel_size_in * 1.2 * cfg.dpi))
    assert pixels.std() > 20
    (tmp_path / "broken.json").write_text("{")
    assert plots.main(["bars", "--summary", str(tmp_path / "broken.json"), "--out", str(out)]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err


def test_overlays_cli(tmp_path: Path, spleen, capsys) -> None:
    out = tmp_path / "gt_only.png"
    assert plots.main(["overlays", "--image", str(spleen["image"]), "--gt", str(spleen["gt"]),
                       "--labels", "1=spleen", "--slices", "1", "--out", str(out)]) == 0
    assert out.is_file() and _png(out)[1].std() > 20
    assert plots.main(["overlays", "--image", str(tmp_path / "none.nii.gz"), "--gt", str(spleen["gt"]),
                       "--out", str(out)]) == 2
    assert "none.nii.gz" in capsys.readouterr().err


def test_plot_finetune_outputs_from_a_run_folder(tmp_path: Path, spleen, cfg, capsys) -> None:
    """A finetune output folder written by finetune's own writers (metrics, summary, per-case CSV, prediction
    NIfTI on the image grid) is turned into scores.png and one overlay per predicted NIfTI case."""
    from types import SimpleNamespace

    from finetune.metrics import evaluate_case, summarize, write_per_case_csv, write_summary_json
    from finetune.preprocess import read_volume, save_label_nifti

    run = tmp_path / "run"
    image = read_volume(spleen["image"])
    gt = read_volume(spleen["gt"]).array.astype(int)  # [Z, Y, X]
    pred = ndimage.binary_erosion(gt > 0, iterations=2).astype(np.uint8)
    classes = {"spleen": [1]}
    per_case = {
        "spleen_2": evaluate_case(pred, gt, image.spacing_zyx, classes, 1.0, "boundary", False),
        "dicom_case": evaluate_case(pred, np.zeros_like(gt), image.spacing_zyx, classes, 1.0, "boundary", False),
    }
    write_per_case_csv(per_case, run / "per_case.csv")
    write_summary_json(summarize(per_case), run / "validation" / "summary.json",
                       {"task": "Dataset009_Spleen", "head": "primus", "fold": "0", "classes": classes})
    save_label_nifti(pred, image, run / "validation" / "spleen_2.nii.gz")
    save_label_nifti(pred, image, run / "validation" / "dicom_case.nii.gz")

    cases = [("dicom_case", tmp_path / "series_dir", None),
             SimpleNamespace(case_id="spleen_2", image=spleen["image"], label=spleen["gt"]),
             ("not_predicted", spleen["image"], spleen["gt"])]
    written = plots.plot_finetune_outputs(run, cases, cfg=cfg)
    assert written == [run / "plots" / "scores.png", run / "plots" / "overlays" / "spleen_2.png"]
    assert "dicom_case" in capsys.readouterr().err
    for path in written:
        assert _png(path)[1].std() > 20
    scores = plots.per_class_scores(json.loads((run / "validation" / "summary.json").read_text()), ["dice", "nsd"])
    assert scores["dice"]["spleen"] == pytest.approx(per_case["spleen_2"]["spleen"]["dice"])
    assert 0.5 < scores["dice"]["spleen"] < 1.0
    # the case whose ground truth lacks the class is not in the spread (as it is not in the summary mean)
    assert plots.per_case_spread(run / "per_case.csv", ["dice"]) == {"dice": {}}
    _, gt_xyz, pred_xyz, _ = plots.load_case(spleen["image"], spleen["gt"], run / "validation" / "spleen_2.nii.gz")
    assert np.array_equal(pred_xyz, pred.transpose(2, 1, 0)) and np.array_equal(gt_xyz, gt.transpose(2, 1, 0))
    assert plots.normalise_class_names({"spleen": [1], "kidney_and_tumor": [1, 2]}) == {1: "spleen"}
    assert plots.normalise_class_names({"background": 0, "liver": 1}) == {1: "liver"}


def test_module_entry_point(tmp_path: Path, repo_root: Path, spleen) -> None:
    """``python -m finetune.plots`` runs as documented."""
    import subprocess
    import sys

    out = tmp_path / "case.png"
    done = subprocess.run([sys.executable, "-m", "finetune.plots", "overlays", "--image", str(spleen["image"]),
                           "--gt", str(spleen["gt"]), "--slices", "1", "--out", str(out)],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and f"wrote {out}" in done.stdout


def test_nsd_is_named_by_its_definition(tmp_path, monkeypatch):
    """The NSD in the bar chart's legend carries its definition and tolerance, whatever summary layout wrote it."""
    assert plots.nsd_definition({"nsd_method": "boundary", "nsd_tolerance_mm": {"default": 1.0}}) == "boundary, τ = 1 mm"
    nnunet_layout = {"nsd_definition": {"method": "surface", "key": "nsd_surface"},
                     "nsd_tolerance_mm": {"default": 1.0, "tumor": 2.0}}
    assert plots.nsd_definition(nnunet_layout) == "surface, τ = 1 mm (per class: tumor 2)"
    assert plots.nsd_definition({"per_class": {"liver": {"dice": 0.9, "nsd_surface": 0.8}}}) == "surface"
    assert plots.nsd_definition({"per_class": {"liver": {"nsd": 0.8}}}) == "definition not recorded"

    legends = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path, dpi: legends.append(
        [t.get_text() for legend in fig.legends for t in legend.get_texts()]) or Path(path))
    _summary(tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "nsd_method": "boundary", "nsd_tolerance_mm": 1.0}))
    plots.plot_summary_bars(tmp_path / "summary.json", tmp_path / "scores.png")
    assert any(text.startswith("NSD (boundary, τ = 1 mm)") for text in legends[0]), legends


def test_config_file_is_merged_strictly(tmp_path: Path, capsys) -> None:
    """``--config`` goes through the one strict loader: a partial file changes only its keys, a typo is one line."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("dpi: 50\nfinetune:\n  n_slices: 2\n")
    cfg = plots.load_config(mine)
    assert (cfg.dpi, cfg.n_slices, cfg.metrics) == (50, 2, ("dice", "nsd"))
    mine.write_text("finetune:\n  n_slice: 2\n")
    _summary(tmp_path / "summary.json")
    assert plots.main(["bars", "--summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "x.png"),
                       "--config", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {mine}: unknown config key finetune.n_slice "
                                               "(did you mean finetune.n_slices?)")
