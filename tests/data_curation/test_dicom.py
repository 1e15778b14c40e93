"""Every awkward real DICOM case gets its documented outcome: decoded, resampled, or rejected with the right reason."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_curation.geometry import to_canonical_axial
from meddino_datasets.readers import dicom as dicom_reader
from meddino_datasets.readers.dicom import DicomPolicy, read_dicom_series


def _read(paths, cfg):
    return read_dicom_series([str(p) for p in paths], DicomPolicy.from_config(cfg["dicom"], cfg["reading"]))


def _reasons(rejections) -> dict[str, str]:
    return {Path(r.path).name: r.reason for r in rejections}


# single-file cases: file -> (outcome, expected reason or HU range of the decoded slice)
SINGLE = {
    "pylibjpeg_data_ct/693_J2KR.dcm": ("decoded", (-1024, 1468)),  # padding -2000 -> -3024 HU masked to air
    "pydicom_data_ct/693_UNCR.dcm": ("decoded", (-1024, 1468)),
    "pylibjpeg_data_ct/CT1_JLSN.dcm": ("decoded", (-3028, 1254)),  # near-lossless: values next to padding survive
    "pylibjpeg_data_ct/ELSCINT1_JP2vsJ2K.dcm": ("decoded", (-1000, 3095)),  # JP2 box, intercept -1000
    "pylibjpeg_data_ct/J2K_pixelrep_mismatch.dcm": ("decoded", (-2000, 1896)),  # tilt -22 deg, single slice
    "pylibjpeg_data_ct/TOSHIBA_J2K_OpenJPEGv2Regression.dcm": ("decoded", (-2048, 1969)),
    "pylibjpeg_data_ct/JPEGLossless_1s_1f_i_16_16_bad.dcm": ("rejected", "hu_out_of_range"),
    "pylibjpeg_data_ct/MAROTECH_CT_JP2Lossy.dcm": ("rejected", "localizer"),  # ImageType LOCALIZER, coronal IOP
    "pylibjpeg_data_ct/TOSHIBA_J2K_SIZ0_PixRep1.dcm": ("rejected", "not_axial"),  # coronal MPR
    "pylibjpeg_data_ct/TOSHIBA_J2K_SIZ1_PixRep0.dcm": ("rejected", "not_axial"),
    "pydicom_data_ct/eCT_Supplemental.dcm": ("rejected", "derived_map"),  # perfusion map, not HU
    "dcm_qa_ct/Philips_localizer_and_rgb/I10_localizer.dcm": ("rejected", "localizer"),
    "dcm_qa_ct/Philips_localizer_and_rgb/I50_rgb_secondary.dcm": ("rejected", "not_grayscale"),
    "dcmqi_ct3slice/liver.dcm": ("rejected", "seg_object"),
}


@pytest.mark.parametrize("rel", sorted(SINGLE))
def test_single_file_outcome(real_data, ct3m_cfg, rel):
    outcome, expected = SINGLE[rel]
    volumes, rejections = _read([real_data / rel], ct3m_cfg)
    if outcome == "decoded":
        assert len(volumes) == 1 and not rejections
        data = volumes[0].data
        assert data.dtype == np.int16 and data.shape[2] == 1
        assert (int(data.min()), int(data.max())) == expected
    else:
        assert volumes == []
        assert _reasons(rejections) == {Path(rel).name: expected}


def test_lossless_decode_oracle(real_data, ct3m_cfg):
    """693_J2KR (JPEG 2000 lossless) and 693_UNCR (uncompressed) are the same image: identical HU."""
    a, _ = _read([real_data / "pylibjpeg_data_ct/693_J2KR.dcm"], ct3m_cfg)
    b, _ = _read([real_data / "pydicom_data_ct/693_UNCR.dcm"], ct3m_cfg)
    np.testing.assert_array_equal(a[0].data, b[0].data)


def test_padding_value_masked(real_data, ct3m_cfg):
    """dcmqi GE slices: PixelPaddingValue -2000 (raw range -3024..1381 HU) -> padding becomes air, tissue intact."""
    volumes, rejections = _read(sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm")), ct3m_cfg)
    assert not rejections and len(volumes) == 1
    data = volumes[0].data
    assert data.shape == (512, 512, 3) and data.min() == -1024 and data.max() == 1381
    raw = pydicom.dcmread(real_data / "dcmqi_ct3slice/dicom/01.dcm").pixel_array
    assert (raw == -2000).sum() > 1000  # there really was padding to mask


def test_functional_group_rescale(real_data, ct3m_cfg):
    """Enhanced CT: rescale (-1024) and spacing exist only in the shared functional groups and are applied."""
    cfg = {**ct3m_cfg, "dicom": {**ct3m_cfg["dicom"], "reject_image_type_tokens": []}}  # admit the perfusion map
    path = real_data / "pydicom_data_ct/eCT_Supplemental.dcm"
    assert "RescaleIntercept" not in pydicom.dcmread(path, stop_before_pixels=True)
    volumes, rejections = _read([path], cfg)
    assert not rejections and len(volumes) == 1
    raw = pydicom.dcmread(path).pixel_array
    assert volumes[0].data.shape == (512, 512, 2)
    expected = (raw.astype(np.int32) - 1024).astype(np.int16)  # frames, in file order
    got = volumes[0].data.transpose(2, 1, 0)  # slices sorted along the normal (here the reverse of file order)
    assert sorted(int(np.abs(g.astype(int) - e).max()) for g in got for e in expected)[:2] == [0, 0]


def test_gantry_tilt_and_variable_spacing_resampled(real_data, ct3m_cfg):
    """GE head: tilt +18.5 deg, gaps 4.002 / 1.081 / 6.999 mm -> de-sheared, exact per-slice positions kept."""
    files = sorted((real_data / "dcm_qa_ct/GE_head_tilt_varspacing").glob("*.dcm"))[9:20]  # keeps tilt + spacing change
    volumes, rejections = _read(files, ct3m_cfg)
    assert not rejections and len(volumes) == 1
    vol = volumes[0]
    assert vol.info["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert vol.info["resampled"] == "gantry_tilt_deshear" and vol.info["variable_spacing"]
    assert vol.info["slice_gaps_mm"] == pytest.approx([1.081, 4.002, 6.999], abs=0.002)
    axial = to_canonical_axial(vol)
    np.testing.assert_allclose(np.diff(axial.positions_mm), [4.002] * 4 + [1.081] + [6.999] * 5, atol=0.002)
    assert axial.array.min() == -1024  # PixelPaddingValue -1500 masked; de-shear fill is air too
    # de-shearing put every pixel where it belongs: the bone centroid of each raw file, mapped to patient space
    # with that file's own IPP/IOP, equals the centroid of the output slice mapped with the volume's affine
    normal = vol.affine[:3, 2] / np.linalg.norm(vol.affine[:3, 2])
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        raw_hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        v, u = np.argwhere(raw_hu > 300).mean(axis=0)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(x) for x in ds.PixelSpacing)
        world_raw = np.asarray(ds.ImagePositionPatient, float) + u * dc * iop[:3] + v * dr * iop[3:]
        world_raw[:2] *= -1  # LPS -> RAS
        j, i = np.argwhere(vol.data[:, :, k].T > 300).mean(axis=0)
        world_out = (vol.affine @ [i, j, 0, 1])[:3] + normal * vol.k_offsets_mm[k]
        assert np.linalg.norm(world_out - world_raw) < 1.5, (k, world_out, world_raw)


def test_gantry_tilt_reject_policy(real_data, ct3m_cfg):
    cfg = {**ct3m_cfg, "dicom": {**ct3m_cfg["dicom"], "gantry_tilt": "reject"}}
    volumes, rejections = _read(sorted((real_data / "dcm_qa_ct/Philips_phantom_tilt_subset").glob("*.dcm")), cfg)
    assert volumes == [] and [r.reason for r in rejections] == ["gantry_tilt"]


def test_philips_tilt_resampled(real_data, ct3m_cfg):
    volumes, rejections = _read(sorted((real_data / "dcm_qa_ct/Philips_phantom_tilt_subset").glob("*.dcm")), ct3m_cfg)
    assert not rejections and volumes[0].info["gantry_tilt_deg"] == pytest.approx(18.5, abs=0.01)
    assert volumes[0].data.shape == (512, 512, 6) and volumes[0].k_offsets_mm is None  # regular 2.371 mm
    assert np.linalg.norm(volumes[0].affine[:3, 2]) == pytest.approx(2.371, abs=0.001)


def test_localizer_and_rgb_never_volumised(real_data, ct3m_cfg):
    volumes, rejections = _read(sorted((real_data / "dcm_qa_ct/Philips_localizer_and_rgb").glob("*.dcm")), ct3m_cfg)
    assert volumes == []
    assert _reasons(rejections) == {"I10_localizer.dcm": "localizer", "I50_rgb_secondary.dcm": "not_grayscale"}


def test_missing_slice_detected(tmp_path, real_data, ct3m_cfg):
    """No real series misses a slice: delete a middle file of a real one (GE slices 1-8, 4.002 mm gaps)."""
    files = sorted((real_data / "dcm_qa_ct/GE_head_tilt_varspacing").glob("*.dcm"))[:8]
    del files[4]
    volumes, rejections = _read(files, ct3m_cfg)
    assert not rejections and volumes[0].info["missing_slices"] == 1
    assert volumes[0].info["slice_gaps_mm"] == pytest.approx([4.002, 8.004], abs=0.002)
    cfg = {**ct3m_cfg, "dicom": {**ct3m_cfg["dicom"], "on_missing_slices": "reject"}}
    volumes, rejections = _read(files, cfg)
    assert volumes == [] and [r.reason for r in rejections] == ["missing_slices"]


def test_duplicate_positions(tmp_path, real_data, ct3m_cfg):
    """An identical copy of a slice is dropped; a same-position slice with other pixels rejects the series."""
    src = sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm"))
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(src[1], tmp_path / "02_copy.dcm")
    volumes, rejections = _read(sorted(tmp_path.glob("*.dcm")), ct3m_cfg)
    assert volumes[0].data.shape[2] == 3 and [r.reason for r in rejections] == ["duplicate_slice"]
    ds = pydicom.dcmread(tmp_path / "02_copy.dcm")
    arr = ds.pixel_array.copy()
    arr[200:300, 200:300] += 50
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "02_copy.dcm")
    volumes, rejections = _read(sorted(tmp_path.glob("*.dcm")), ct3m_cfg)
    assert volumes == [] and [r.reason for r in rejections] == ["duplicate_position_conflict"]


def test_toshiba_pair_shares_a_position(real_data, ct3m_cfg):
    """The TOSHIBA SIZ0/SIZ1 pair: same series, same position; PixRep0 lost the sign. With coronal series admitted
    (max_tilt_deg 90), the sign-lost file fails the HU check and the other survives alone."""
    cfg = {**ct3m_cfg, "dicom": {**ct3m_cfg["dicom"], "max_tilt_deg": 90}}
    files = [real_data / "pylibjpeg_data_ct" / n for n in ("TOSHIBA_J2K_SIZ0_PixRep1.dcm", "TOSHIBA_J2K_SIZ1_PixRep0.dcm")]
    volumes, rejections = _read(files, cfg)
    assert _reasons(rejections) == {"TOSHIBA_J2K_SIZ1_PixRep0.dcm": "hu_out_of_range"}
    assert len(volumes) == 1 and volumes[0].data.min() == -2048


def test_no_decoder_is_a_clear_error(real_data, ct3m_cfg, monkeypatch):
    import pydicom.pixels

    class _Missing:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _Missing())
    volumes, rejections = _read([real_data / "pylibjpeg_data_ct/693_J2KR.dcm"], ct3m_cfg)
    assert volumes == [] and rejections[0].reason == "no_decoder"
    assert "JPEG 2000" in rejections[0].detail and "pip install pylibjpeg" in rejections[0].detail


def test_uncompressed_needs_no_decoder(real_data, ct3m_cfg, monkeypatch):
    monkeypatch.setattr(dicom_reader, "_DECODER_HINT", "unused")
    volumes, rejections = _read([real_data / "pydicom_data_ct/693_UNCR.dcm"], ct3m_cfg)
    assert len(volumes) == 1 and not rejections


def test_non_dicom_file_rejected(tmp_path, ct3m_cfg):
    bad = tmp_path / "notes.dcm"
    bad.write_bytes(b"not a dicom file at all")
    volumes, rejections = _read([bad], ct3m_cfg)
    assert volumes == [] and rejections[0].reason == "unreadable" and rejections[0].path == str(bad)


def test_series_grouping_in_one_folder(tmp_path, real_data, ct3m_cfg):
    """Two series in one folder (GE 3-slice series + the 693 slice) -> two volumes, told apart by a one-way tag of
    the series UID (the UID itself never leaves the reader)."""
    files = sorted((real_data / "dcmqi_ct3slice/dicom").glob("*.dcm")) + [real_data / "pydicom_data_ct/693_UNCR.dcm"]
    volumes, rejections = _read(files, ct3m_cfg)
    assert not rejections and sorted(v.data.shape[2] for v in volumes) == [1, 3]
    suffixes = [v.volume_suffix for v in volumes]
    assert len(set(suffixes)) == 2 and all(len(s) == 8 and int(s, 16) >= 0 for s in suffixes)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files}
    assert not any(s in uid for s in suffixes for uid in uids)


def _ts_series(real_data: Path) -> list[Path]:
    return sorted(p for p in (real_data / "totalsegmentator" / "example_ct_dicom").rglob("*") if p.is_file())


@pytest.mark.parametrize("cut", [200, 800, 4900, 78000, -100])  # in the header, before/inside the pixel data, near the end
def test_truncated_slice_is_a_failure_and_the_series_survives(tmp_path, real_data, ct3m_cfg, cut):
    """A copy cut short is ``truncated`` (a failure), never the by-design filter "not CT: Modality missing"."""
    files = _ts_series(real_data)[:5]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    damaged = tmp_path / files[2].name
    damaged.write_bytes(damaged.read_bytes()[:cut])
    volumes, rejections = _read(sorted(tmp_path.iterdir()), ct3m_cfg)
    assert [(Path(r.path).name, r.reason, r.filtered) for r in rejections] == [(damaged.name, "truncated", False)]
    assert len(volumes) == 1 and volumes[0].data.shape[2] == 4


def test_negative_pixel_spacing_is_refused_not_mirrored(tmp_path, real_data, ct3m_cfg):
    """A negative PixelSpacing would lay the pixels out mirrored (a 180 deg rotation after canonicalisation) while
    the slices are still labelled LPS: the file is refused as ``bad_geometry``."""
    for f in _ts_series(real_data)[:3]:
        ds = pydicom.dcmread(str(f))
        ds.PixelSpacing = [-float(v) for v in ds.PixelSpacing]
        ds.save_as(str(tmp_path / f.name))
    volumes, rejections = _read(sorted(tmp_path.iterdir()), ct3m_cfg)
    assert not volumes and {r.reason for r in rejections} == {"bad_geometry"} and not rejections[0].filtered
    assert "must be positive" in rejections[0].detail
