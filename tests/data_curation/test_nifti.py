"""The NIfTI reader gives the same volume whichever gzip decoder inflates the file (ISA-L or Python's zlib)."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

import meddino_datasets.readers.nifti as nifti
from meddino_datasets.readers.common import ImageRejected

REAL_NIFTI = ("totalsegmentator/example_ct.nii.gz", "totalsegmentator/aorta_report/ct_cropped.nii.gz",
              "ivadomed_msd_spleen/sub-spleen2_ct.nii.gz")


def _read_both(path, cfg, monkeypatch):
    assert nifti._igzip is not None, "isal is a dependency of the project (pyproject.toml)"
    fast = nifti.read_nifti(path, cfg)
    with monkeypatch.context() as m:
        m.setattr(nifti, "_igzip", None)
        plain = nifti.read_nifti(path, cfg)
    return fast, plain


@pytest.mark.parametrize("rel", REAL_NIFTI)
def test_isal_and_zlib_read_the_same_volume(rel, real_data, ct3m_cfg, monkeypatch):
    fast, plain = _read_both(real_data / rel, ct3m_cfg["reading"], monkeypatch)
    reference = np.asanyarray(nib.load(real_data / rel).dataobj)
    for vol in (fast, plain):
        np.testing.assert_array_equal(vol.data, reference)
        np.testing.assert_array_equal(vol.affine, nib.load(real_data / rel).affine)
        assert vol.info == plain.info


def test_nifti2_big_endian_and_uncompressed(tmp_path, real_data, ct3m_cfg, monkeypatch):
    """Header sniffing: a NIfTI-2 file and a big-endian NIfTI-1 file, gzipped, and a plain .nii, all read right."""
    src = nib.load(real_data / REAL_NIFTI[2])
    data = np.asanyarray(src.dataobj)
    nib.save(nib.Nifti2Image(data, src.affine), tmp_path / "n2.nii.gz")
    big = nib.Nifti1Image(data.astype(">i2"), src.affine, nib.Nifti1Header(endianness=">"))
    nib.save(big, tmp_path / "big.nii")
    (tmp_path / "big.nii.gz").write_bytes(gzip.compress((tmp_path / "big.nii").read_bytes()))
    assert (tmp_path / "big.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    for name in ("n2.nii.gz", "big.nii.gz", "big.nii"):
        fast, plain = _read_both(tmp_path / name, ct3m_cfg["reading"], monkeypatch)
        np.testing.assert_array_equal(fast.data, data)
        np.testing.assert_array_equal(plain.data, data)
        np.testing.assert_allclose(fast.affine, src.affine)


def test_truncated_gzip_is_unreadable_with_both_decoders(tmp_path, real_data, ct3m_cfg, monkeypatch):
    whole = (real_data / REAL_NIFTI[2]).read_bytes()
    for cut in (200, len(whole) // 2):  # inside the header / inside the voxel data
        path = tmp_path / f"cut{cut}.nii.gz"
        path.write_bytes(whole[:cut])
        for decoder in (nifti._igzip, None):
            with monkeypatch.context() as m:
                m.setattr(nifti, "_igzip", decoder)
                with pytest.raises(ImageRejected) as err:
                    nifti.read_nifti(path, ct3m_cfg["reading"])
            assert err.value.rejection.reason == "unreadable" and path.name in err.value.rejection.path


def test_all_nan_volume_is_a_failure(tmp_path, real_data, ct3m_cfg):
    """An all-NaN float volume is ``all_nonfinite`` (a failure), not a volume of air that silently keeps 0 slices."""
    import nibabel as nib
    import numpy as np

    from meddino_datasets.readers.common import ImageRejected
    from meddino_datasets.readers.nifti import read_nifti

    ref = nib.load(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full(ref.shape, np.nan, np.float32), ref.affine), str(path))
    with pytest.raises(ImageRejected) as err:
        read_nifti(path, ct3m_cfg["reading"])
    assert err.value.rejection.reason == "all_nonfinite" and not err.value.rejection.filtered
    assert f"{int(np.prod(ref.shape))} voxels is NaN or Inf" in err.value.rejection.detail
