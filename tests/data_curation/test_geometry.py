"""NIfTI and DICOM end in the same canonical axial orientation with consistent HU; in-plane geometry is as configured."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_curation.geometry import _bilinear_separable, center_crop_pad, output_geometry, resample_slices, select_slices, to_canonical_axial
from meddino_datasets.readers.common import ImageRejected, RawVolume
from meddino_datasets.readers.dicom import DicomPolicy, read_dicom_series
from meddino_datasets.readers.nifti import read_nifti
from data_curation.settings import load_settings

SHIPPED = load_settings().geometry  # configs/data/ct3m.yaml: 256x256 from 0.45 mm, resize, keep aspect, linear, area


def _labels(path: Path) -> np.ndarray:
    img = nib.load(path)
    return to_canonical_axial(RawVolume(np.asarray(img.dataobj).astype(np.int16), img.affine)).array


def _organ_means(hu: np.ndarray, labels: np.ndarray, ids: dict[str, int]) -> dict[str, float]:
    return {name: float(hu[labels == i].mean()) for name, i in ids.items()}


@pytest.fixture(scope="module")
def dicom_axial(real_data, ct3m_cfg):
    files = sorted((real_data / "totalsegmentator" / "example_ct_dicom").iterdir())
    volumes, rejections = read_dicom_series([str(f) for f in files], DicomPolicy.from_config(ct3m_cfg["dicom"], ct3m_cfg["reading"]))
    assert not rejections and len(volumes) == 1
    return volumes[0], to_canonical_axial(volumes[0])


def test_totalseg_nifti_and_dicom_consistent(real_data, ct3m_cfg, dicom_axial):
    """Both formats: labels stored in another orientation (RAS; LAS for the DICOM's labels) line up with the image
    only through the affine, and the organ means are the documented HU (NIfTI: spleen 33, liver 45, aorta 42;
    DICOM: spleen 80, liver 89, aorta 177). Canonical orientation is the same: the liver (patient right) sits at
    smaller column indices than the spleen (patient left) in both."""
    ts = real_data / "totalsegmentator"
    ids = {"spleen": 1, "liver": 5, "aorta": 52}
    nii = to_canonical_axial(read_nifti(ts / "example_ct.nii.gz", ct3m_cfg["reading"]))
    nii_lab = _labels(ts / "example_seg_fast_force_split.nii.gz")
    _, dcm = dicom_axial
    dcm_lab = _labels(ts / "example_seg_dicom.nii.gz")
    assert nii.array.shape == nii_lab.shape and dcm.array.shape == dcm_lab.shape == (20, 512, 512)
    got_nii, got_dcm = _organ_means(nii.array, nii_lab, ids), _organ_means(dcm.array, dcm_lab, ids)
    assert got_nii == pytest.approx({"spleen": 33, "liver": 45, "aorta": 42}, abs=3)
    assert got_dcm == pytest.approx({"spleen": 80, "liver": 89, "aorta": 177}, abs=3)
    for arr, lab in ((nii.array, nii_lab), (dcm.array, dcm_lab)):
        col = {name: np.argwhere(lab == i)[:, 2].mean() for name, i in ids.items()}
        row = {name: np.argwhere(lab == i)[:, 1].mean() for name, i in ids.items()}
        assert col["liver"] < col["aorta"] < col["spleen"]  # columns run R -> L
        assert row["aorta"] > np.argwhere(lab > 0)[:, 1].min()  # rows run A -> P: aorta behind the abdominal wall
    z = {name: np.argwhere(nii_lab == i)[:, 0].mean() for name, i in {"liver": 5, "urinary_bladder": 21}.items()}
    assert z["urinary_bladder"] < z["liver"]  # slices run I -> S
    assert nii.spacing_mm == (3.0, 3.0) and dcm.spacing_mm == pytest.approx((0.9765625, 0.9765625))
    np.testing.assert_allclose(np.diff(dcm.positions_mm), 2.0, atol=1e-3)


def test_dicom_to_nifti_roundtrip_any_orientation_and_dtype(tmp_path, ct3m_cfg, dicom_axial):
    """The DICOM volume saved as NIfTI in other orientations and dtypes (float32 RAS, int32 LPS) reads back identical."""
    raw, axial = dicom_axial
    for name, codes, dtype in (("ras.nii.gz", ("R", "A", "S"), np.float32), ("lps.nii", ("L", "P", "S"), np.int32), ("psl.nii.gz", ("P", "S", "L"), np.int16)):
        ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(raw.affine), nib.orientations.axcodes2ornt(codes))
        data = nib.orientations.apply_orientation(raw.data, ornt).astype(dtype)
        affine = raw.affine @ nib.orientations.inv_ornt_aff(ornt, raw.data.shape)
        nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
        back = to_canonical_axial(read_nifti(tmp_path / name, ct3m_cfg["reading"]))
        np.testing.assert_array_equal(back.array, axial.array)
        assert back.spacing_mm == pytest.approx(axial.spacing_mm)


def test_nifti_nan_and_scaling(tmp_path, ct3m_cfg, sample_ct):
    """float NIfTI with NaN/inf: non-finite voxels become air and are counted; scl_slope/inter are applied."""
    img = nib.load(sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0], data[1, 0, 0] = np.nan, np.inf
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "nan.nii.gz")
    vol = read_nifti(tmp_path / "nan.nii.gz", ct3m_cfg["reading"])
    assert vol.info["nonfinite_voxels"] == 2 and vol.data[0, 0, 0] == -1024 and vol.data[1, 0, 0] == -1024
    scaled = nib.Nifti1Image(((data[2:] + 1024) / 2).round().astype(np.int16), img.affine)
    scaled.header.set_slope_inter(2.0, -1024.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(read_nifti(tmp_path / "scaled.nii.gz", ct3m_cfg["reading"]).data, np.rint(data[2:] / 2) * 2, atol=2)


def test_nifti_not_hu_rejected(tmp_path, ct3m_cfg, sample_ct):
    img = nib.load(sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 20, img.affine), tmp_path / "x20.nii.gz")
    with pytest.raises(ImageRejected) as err:
        read_nifti(tmp_path / "x20.nii.gz", ct3m_cfg["reading"])
    assert err.value.rejection.reason == "hu_out_of_range" and "x20.nii.gz" in err.value.rejection.path
    (tmp_path / "broken.nii.gz").write_bytes((sample_ct / "msd_spleen" / "sub-spleen2_ct.nii.gz").read_bytes()[:5000])
    with pytest.raises(ImageRejected) as err:
        read_nifti(tmp_path / "broken.nii.gz", ct3m_cfg["reading"])
    assert err.value.rejection.reason == "unreadable"


def test_output_geometry_modes():
    # paper default: whole FOV to 256x256, square pixels (512x512 at 0.78 mm -> 1.5625 mm)
    cfg = SHIPPED
    assert (cfg.inplane_spacing_mm, cfg.output_size, cfg.fit, cfg.keep_aspect) == (0.45, (256, 256), "resize", True)
    assert output_geometry((512, 512), (0.78125, 0.78125), cfg) == ((256, 256), (1.5625, 1.5625), None)
    # non-square matrix (716x512 at 0.977 mm): longer side fills, the other is padded; pixels stay square
    shape, spacing, crop = output_geometry((716, 512), (0.9765625, 0.9765625), cfg)
    assert shape == (256, 183) and crop == (256, 256) and spacing[0] == pytest.approx(spacing[1], rel=0.01)
    # pad_crop: uniform 0.45 mm, centre crop to 256 (115 mm field of view)
    shape, spacing, crop = output_geometry((512, 512), (0.9, 0.9), replace(cfg, fit="pad_crop"))
    assert shape == (1024, 1024) and spacing == (0.45, 0.45) and crop == (256, 256)
    # native
    assert output_geometry((512, 512), (0.7, 0.7), replace(cfg, inplane_spacing_mm=None, output_size=None)) == ((512, 512), (0.7, 0.7), None)


def test_resample_preserves_hu_and_pads(dicom_axial):
    _, axial = dicom_axial
    cfg = SHIPPED
    assert (cfg.interpolation, cfg.antialias, cfg.pad_value_hu) == ("linear", True, -1024)
    out = resample_slices(axial.array[:4], (256, 183), (256, 256), cfg)
    assert out.shape == (4, 256, 256) and out.dtype == np.int16
    assert (out[:, :, :36] == -1024).all() and (out[:, :, -37:] == -1024).all()
    # downsampling by 2 (default downsample: area) is the exact 2x2 mean of the real slice
    half = resample_slices(axial.array[:2], (256, 256), None, replace(cfg, downsample="area"))
    ref = axial.array[:2].astype(np.float64).reshape(2, 256, 2, 256, 2).mean(axis=(2, 4))
    assert np.array_equal(half, np.rint(ref))  # exactly: the mean rounded half to even
    third = resample_slices(axial.array[:1, :510, :510], (170, 170), None, replace(cfg, downsample="area"))
    assert np.abs(third - axial.array[:1, :510, :510].astype(np.float64).reshape(1, 170, 3, 170, 3).mean(axis=(2, 4))).max() <= 0.5 + 1e-6
    smooth = resample_slices(axial.array[:2], (256, 256), None, replace(cfg, downsample="antialias"))
    assert abs(float(smooth.mean()) - float(axial.array[:2].mean())) < 2.0 and not np.array_equal(smooth, half)
    assert center_crop_pad(np.ones((1, 4, 6), np.int16), (6, 2), 0).tolist() == [[[0, 0], [1, 1], [1, 1], [1, 1], [1, 1], [0, 0]]]


def _torch_bilinear(slices: np.ndarray, out_hw: tuple[int, int], antialias: bool = False) -> np.ndarray:
    """The reference: torch's 2-D bilinear kernel on float32, rounded half to even to int16."""
    y = F.interpolate(torch.from_numpy(slices.astype(np.float32))[:, None], size=out_hw, mode="bilinear", align_corners=False,
                      antialias=antialias)
    return np.rint(y[:, 0].numpy()).astype(np.int16)


def test_linear_upsampling_matches_torch_bilinear_on_real_ct(real_data, ct3m_cfg):
    """The separable linear path gives torch's bilinear HU on a real small-matrix CT (TotalSegmentator example,
    101x122 at 3 mm): the configured keep-aspect upsampling (-> 212x256, padded to 256x256), a crop of it enlarged to
    256x244, and a mixed case (rows shrink, columns grow: torch's anti-aliased bilinear). Only float rounding
    order differs, so a pixel may differ by 1 HU at an exact .5 tie: >= 99.9% identical, never more than 1 HU apart."""
    ct = to_canonical_axial(read_nifti(real_data / "totalsegmentator" / "example_ct.nii.gz", ct3m_cfg["reading"]))
    geo = SHIPPED
    out_hw, _, crop_to = output_geometry(ct.array.shape[1:], ct.spacing_mm, geo)
    assert ct.array.shape[1:] == (101, 122) and out_hw == (212, 256) and crop_to == (256, 256) and geo.interpolation == "linear"
    padded = resample_slices(ct.array, out_hw, crop_to, geo)
    assert padded.shape == (len(ct.array), 256, 256) and (padded[:, :22] == geo.pad_value_hu).all()
    for slices, hw in ((ct.array, out_hw), (ct.array[:, 2:98, 10:110], (256, 244)), (ct.array, (80, 256))):
        mixed = hw[0] < slices.shape[1] and hw[1] > slices.shape[2]
        got, ref = resample_slices(np.ascontiguousarray(slices), hw, None, geo), _torch_bilinear(slices, hw, antialias=mixed)
        diff = np.abs(got.astype(np.int32) - ref)
        assert got.shape == ref.shape == (len(slices), *hw) and got.dtype == np.int16
        assert (diff == 0).mean() >= 0.999 and diff.max() <= 1
    np.testing.assert_array_equal(padded[:, 22:234], resample_slices(ct.array, out_hw, None, geo))


def test_bilinear_separable_edges_and_weights():
    """Half-pixel centres clamped at both borders, on exact values (scale 1/4: source coordinate i/4 - 3/8): a ramp of
    8 HU per pixel along both axes maps to 8 * clip(i/4 - 3/8, 0, n - 1) per axis, exactly as torch's bilinear gives;
    a constant stays constant; an axis whose size does not change is copied untouched; shrinking an axis without
    antialias keeps torch's point-sampled linear."""
    rows, cols = np.meshgrid(np.arange(16), np.arange(12), indexing="ij")
    ramp = (8 * rows + 8 * cols).astype(np.int16)[None].repeat(2, axis=0)
    got = resample_slices(ramp, (64, 48), None, SHIPPED)
    i, j = np.meshgrid(np.arange(64), np.arange(48), indexing="ij")
    expected = np.clip(2 * i - 3, 0, 8 * 15) + np.clip(2 * j - 3, 0, 8 * 11)
    np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))
    np.testing.assert_array_equal(got, _torch_bilinear(ramp, (64, 48)))
    for value in (-1024, 0, 3071):
        assert (resample_slices(np.full((3, 5, 7), value, np.int16), (13, 17), None, SHIPPED) == value).all()
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 500, size=(3, 9, 11)).astype(np.float32))
    for hw in ((9, 31), (23, 11), (4, 30), (30, 4), (1, 5), (6, 1)):
        ref = F.interpolate(x[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
        got = _bilinear_separable(x, hw)
        assert got.shape == (3, *hw)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
        if hw[0] == 9:  # rows unchanged: exactly the 1-D interpolation of each row
            assert torch.equal(got, F.interpolate(x, size=hw[1], mode="linear", align_corners=False))


def test_select_slices_by_mm():
    pos = np.arange(0, 10, 0.625)
    assert select_slices(pos, None).tolist() == list(range(16))
    assert select_slices(pos, 2.5).tolist() == [0, 4, 8, 12]
    assert select_slices(np.array([0, 4, 8, 9.1, 16.1]), 5.0).tolist() == [0, 2, 4]


def test_mr_nifti_is_not_ct(real_data, ct3m_cfg):
    """NIfTI has no modality: the real abdominal and brain MRs are caught by their missing air (filtered, by design)."""
    for rel in ("totalsegmentator/example_mr_sm.nii.gz", "pyradiomics/brain1_image.nii.gz"):
        with pytest.raises(ImageRejected) as err:
            read_nifti(real_data / rel, ct3m_cfg["reading"])
        assert err.value.rejection.reason == "not_ct_intensity" and err.value.rejection.filtered
    for rel in ("totalsegmentator/example_ct.nii.gz", "totalsegmentator/aorta_report/ct_cropped.nii.gz", "ivadomed_msd_spleen/sub-spleen2_ct.nii.gz"):
        read_nifti(real_data / rel, ct3m_cfg["reading"])  # every real CT passes


def test_resample_reads_flipped_and_transposed_views(real_data):
    """The worker passes canonical views (flips, transposes) straight in: every mode and shape gives what the
    contiguous copy gives."""
    vol = np.asanyarray(nib.load(real_data / "totalsegmentator" / "aorta_report" / "ct_cropped.nii.gz").dataobj).astype(np.int16)
    for view in (vol.transpose(2, 1, 0)[:5, ::-1, ::-1], vol.transpose(2, 0, 1)[5:0:-1, :, ::-1]):
        for out_hw, crop in (((256, 244), (256, 256)), ((60, 63), None), (view.shape[1:], (100, 100)), (view.shape[1:], None)):
            for mode in ("linear", "cubic", "nearest", "area"):
                cfg = replace(SHIPPED, interpolation=mode)
                got = resample_slices(view, out_hw, crop, cfg)
                np.testing.assert_array_equal(got, resample_slices(np.ascontiguousarray(view), out_hw, crop, cfg))


def test_mixed_shrink_and_grow_is_antialiased():
    """Non-square pixels: columns shrink 3x while rows grow. Period-2 stripes along the shrinking axis must average
    out (anti-aliasing), not alias into a pattern as point-sampled linear interpolation does; the growing axis is
    untouched by the filter (a row ramp stays a ramp)."""
    stripes = np.zeros((1, 50, 300), dtype=np.int16)
    stripes[:, :, 1::2] = 1000
    got = resample_slices(stripes, (120, 100), None, SHIPPED)
    assert got.shape == (1, 120, 100)
    interior = got[:, :, 2:-2].astype(np.float64)
    assert abs(interior.mean() - 500) < 5 and interior.std() < 100  # a tent filter leaves a +-11% ripple at 3x
    plain = resample_slices(stripes, (120, 100), None, replace(SHIPPED, antialias=False))
    assert plain[:, :, 2:-2].std() > 400  # point sampling hits every other stripe: 0 / 1000 -- what the filter prevents
    ramp = np.repeat((np.arange(50, dtype=np.int16) * 10)[None, :, None], 300, axis=2)
    np.testing.assert_array_equal(resample_slices(ramp, (120, 100), None, SHIPPED),
                                  resample_slices(ramp[:, :, :100], (120, 100), None, SHIPPED))
