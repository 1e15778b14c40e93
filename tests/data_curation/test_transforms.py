"""The default train-time transform is MedDINOv3's: clamp [-1000, 1000], (x - 65.1084) / 178.0166, 3 channels."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from data_curation.shards import decode_image, encode_image
from data_curation.transforms import normalize_from_config


def test_meddinov3_normalisation(ct3m_cfg, dicom_slice):
    out = normalize_from_config(dicom_slice, ct3m_cfg)
    assert out.shape == (3, *dicom_slice.shape) and out.dtype == torch.float32
    assert torch.equal(out[0], out[2])
    ref = (np.clip(dicom_slice.astype(np.float64), -1000, 1000) - 65.1084) / 178.0166
    np.testing.assert_allclose(out[1].numpy(), ref, atol=1e-5)
    assert out.min().item() == pytest.approx((-1000 - 65.1084) / 178.0166, abs=1e-5)
    batch = normalize_from_config(np.stack([dicom_slice, dicom_slice]), ct3m_cfg)
    assert batch.shape == (2, 3, *dicom_slice.shape)


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_image_encodings_are_lossless(dicom_slice, fmt):
    ext, data = encode_image(dicom_slice, fmt)
    back = decode_image(ext, data)
    assert back.dtype == np.int16 and np.array_equal(back, dicom_slice)
    if fmt == "npy":
        assert np.array_equal(np.load(io.BytesIO(data)), dicom_slice)  # plain np.load works


@pytest.fixture(scope="module")
def dicom_slice(real_data, ct3m_cfg) -> np.ndarray:
    from data_curation.readers.dicom import read_dicom_series

    vols, _ = read_dicom_series([str(real_data / "pydicom_data_ct/693_UNCR.dcm")], ct3m_cfg["dicom"], ct3m_cfg["reading"])
    return np.ascontiguousarray(vols[0].data[:, :, 0].T)
