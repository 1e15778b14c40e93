"""Readers: NIfTI (:mod:`.nifti`) and DICOM (:mod:`.dicom`) -> int16 HU volume + voxel->RAS affine."""
