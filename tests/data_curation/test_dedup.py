"""Cross-source de-duplication on the embedded real CT: the same scan stored another way (dtype, orientation) is
found and the higher-priority copy kept; a different scan of the same shape is not; fingerprints survive the
journal's JSON."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_curation.dedup import Fingerprint, find_duplicates, slice_descriptors, volume_fingerprint
from data_curation.geometry import AxialVolume, to_canonical_axial
from meddino_datasets.readers.nifti import read_nifti
from data_curation.settings import load_settings

SETTINGS = load_settings()  # dedup.grid [16, 16, 16], max_mean_abs_diff_hu 2.0, extent_rel_tol 0.01 (shipped)
SPLEEN = "msd_spleen/sub-spleen2_ct.nii.gz"  # real CT, float32 RAS, 164x166x26 at 0.79 x 0.79 x 5 mm


def _axial(path: Path) -> AxialVolume:
    return to_canonical_axial(read_nifti(path, SETTINGS.reading))


def _fingerprint(uid: str, vol: AxialVolume) -> Fingerprint:
    """As the worker computes it: per-slice descriptors of every native slice, then the volume's."""
    grid = SETTINGS.dedup.grid
    per_slice = slice_descriptors(vol.array, grid[1:])
    return volume_fingerprint(uid, per_slice, vol.array.shape, (vol.slice_spacing_mm, *vol.spacing_mm), grid[0])


@pytest.fixture(scope="module")
def spleen(sample_ct) -> AxialVolume:
    return _axial(sample_ct / SPLEEN)


@pytest.fixture(scope="module")
def spleen_resaved(sample_ct, tmp_path_factory) -> AxialVolume:
    """The same scan as another dataset might ship it: int16, stored LPS (x and y flipped), another affine."""
    img = nib.load(sample_ct / SPLEEN)
    data = np.rint(np.asarray(img.dataobj)).astype(np.int16)[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [s - 1 for s in data.shape[:2]]
    path = tmp_path_factory.mktemp("resaved") / "spleen_lps.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip), path)
    return _axial(path)


def test_descriptors_are_block_means_of_clipped_hu(spleen):
    """``[N, H, W]`` -> ``[N, 16, 16]`` means of HU clipped to [-1024, 2000] (on every step-th pixel): checked against
    numpy block means on a 256x256 real crop (step 2: 8x8 blocks of the 128x128 subsample)."""
    slices = np.zeros((3, 256, 256), np.int16)
    slices[:] = -3024  # out-of-field fill, clipped to -1024
    slices[:, :166, :164] = spleen.array[:3]
    slices[0, 200:, 200:] = 3000  # bright metal, clipped to 2000
    got = slice_descriptors(slices, (16, 16))
    sub = np.clip(slices[:, ::2, ::2].astype(np.float64), -1024, 2000)
    want = sub.reshape(3, 16, 8, 16, 8).mean(axis=(2, 4))
    assert got.shape == (3, 16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_short_volume_grid_is_padded_to_one_shape():
    """A volume with fewer slices than grid z: one bin per slice, the last repeated, so every descriptor is [16, gh, gw]."""
    per_slice = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2)
    fp = volume_fingerprint("folder/x", per_slice, (5, 64, 64), (2.5, 0.8, 0.8), 16)
    assert fp.descriptor.shape == (16, 2, 2)
    np.testing.assert_array_equal(fp.descriptor[:5], per_slice)
    assert (fp.descriptor[5:] == per_slice[-1]).all()
    assert fp.extent_mm == pytest.approx((12.5, 51.2, 51.2)) and fp.shape == (5, 64, 64)


def test_fingerprint_survives_the_journal_json(spleen):
    fp = _fingerprint("folder/spleen", spleen)
    back = Fingerprint.from_dict(json.loads(json.dumps(fp.as_dict())))
    assert (back.uid, back.shape) == (fp.uid, fp.shape) and back.extent_mm == pytest.approx(fp.extent_mm, abs=1e-3)
    np.testing.assert_array_equal(back.descriptor, fp.descriptor)
    assert fp.descriptor.shape == tuple(SETTINGS.dedup.grid)


def test_same_scan_stored_another_way_is_found_and_priority_decides(spleen, spleen_resaved):
    """float32 RAS vs int16 LPS copies of one real scan: same canonical shape and extent, descriptors within a fraction
    of a HU. The copy kept belongs to the source listed first in the priority (the config's ``sources`` order),
    whatever order the fingerprints come in."""
    folder, ctorg = _fingerprint("folder/spleen", spleen), _fingerprint("ctorg/volume-7", spleen_resaved)
    assert folder.shape == ctorg.shape == (26, 166, 164)
    priority = list(SETTINGS.sources)
    assert priority.index("ctorg") < priority.index("folder")
    args = (priority, SETTINGS.dedup.max_mean_abs_diff_hu, SETTINGS.dedup.extent_rel_tol)
    found = find_duplicates([folder, ctorg], *args)
    assert [(d["dropped"], d["kept"]) for d in found] == [("folder/spleen", "ctorg/volume-7")]
    assert found[0]["mean_abs_diff_hu"] < 0.5
    assert find_duplicates([ctorg, folder], *args) == found


def test_other_scan_of_the_same_shape_or_another_extent_is_kept(spleen):
    """The same real slices in reverse order (another anatomy at each z: same shape and extent) differ by tens of HU;
    an identical descriptor whose extent differs by 5% (another pixel spacing) is another scan too."""
    fp = _fingerprint("folder/a", spleen)
    reversed_z = AxialVolume(spleen.array[::-1].copy(), spleen.spacing_mm, spleen.positions_mm, spleen.affine)
    other = _fingerprint("folder/b", reversed_z)
    assert other.shape == fp.shape and float(np.abs(other.descriptor - fp.descriptor).mean()) > 10
    wider = Fingerprint("folder/c", fp.shape, (fp.extent_mm[0], fp.extent_mm[1] * 1.05, fp.extent_mm[2]), fp.descriptor)
    same = Fingerprint("folder/d", fp.shape, fp.extent_mm, fp.descriptor)
    found = find_duplicates([fp, other, wider, same], list(SETTINGS.sources), SETTINGS.dedup.max_mean_abs_diff_hu,
                            SETTINGS.dedup.extent_rel_tol)
    assert [(d["dropped"], d["kept"]) for d in found] == [("folder/d", "folder/a")]  # ties: the smaller uid is kept
