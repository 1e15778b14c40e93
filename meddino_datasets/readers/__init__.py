"""Image readers shared by curation and finetuning: NIfTI (:mod:`.nifti`), DICOM (:mod:`.dicom`), and the other
formats nnU-Net datasets use (:mod:`.sitk`).

One orientation convention, for every reader here:

- ``affine`` (4x4) maps a voxel index ``(i, j, k)`` to **RAS+** world millimetres (+x towards the patient's right,
  +y anterior, +z superior): nibabel's convention for NIfTI.
- ``data`` is indexed ``[i, j, k]`` in the file's own voxel order (nothing is reoriented or flipped at read time).

DICOM and ITK store geometry in LPS; the readers negate x and y once (``LPS_TO_RAS``), so a DICOM series and the
NIfTI converted from it get the same affine. For DICOM ``i`` runs along the columns of a slice, ``j`` along its
rows and ``k`` through the slices sorted along the slice normal; for ITK formats ``(i, j, k)`` is ITK's index.

Consumers convert at their own edge, never here: curation's :mod:`data_curation.geometry` turns a volume into
axial slices (``to_canonical_axial``); finetuning works on axial-first arrays ``[Z, Y, X] = data.transpose(2, 1, 0)``
(:func:`.common.axial_first`); figures flip rows for display where they draw.
"""
