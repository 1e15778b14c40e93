"""THE case: one image volume of a dataset, as curation and finetuning both find it in the owners' layouts.

Finetuning needs an image and its label (``case_id`` names it in the split); curation needs what to read (one NIfTI
file, or every candidate file of one DICOM folder, which the reader groups into series), which dataset it came
from (the first part of its sample keys) and the owners' split (``--holdout-finetune``). One type carries both, so
a layout (:mod:`meddino_datasets.layouts`) can hand the same cases to either side.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

KINDS = ("nifti", "dicom")


@dataclass(frozen=True)
class Case:
    """One volume.

    ``case_id``: the dataset's own case name (finetune: the id nnU-Net's split sorts; curation: made safe for
    webdataset keys, no dots or slashes). ``image``: the image file (NIfTI or any format ITK reads), or for a
    DICOM case the folder holding its files. ``label``: the label file, ``None`` when unlabelled or not needed.
    ``source``: the dataset (curation source name). ``kind``: ``nifti`` (one file, also ITK formats) or ``dicom``
    (``dicom_files`` lists every candidate file; the reader may find several series). ``split``: ``train`` /
    ``val`` / ``test`` where the owners say so. ``source_path``: where the case lives relative to the source
    root, kept in curation's sample json and manifest.
    """

    case_id: str
    image: Path
    label: Optional[Path] = None
    source: str = ""
    kind: str = "nifti"
    dicom_files: tuple[str, ...] = ()
    split: str = ""
    source_path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"case {self.case_id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "dicom" and not self.dicom_files:
            raise ValueError(f"case {self.case_id}: a DICOM case needs its files (dicom_files)")

    @property
    def paths(self) -> tuple[str, ...]:
        """The files to read: the image file, or every DICOM file of the case."""
        return self.dicom_files if self.kind == "dicom" else (str(self.image),)

    @property
    def uid(self) -> str:
        """``source/case_id``: unique across the datasets of one curation run."""
        return f"{self.source}/{self.case_id}"


def require_unique_ids(ids: list[str], where: str) -> None:
    """One case id per case: the split and the cache are keyed by it (``where`` names the folder in the error)."""
    seen: set[str] = set()
    duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
    if duplicates:
        raise ValueError(f"{where}: duplicate case ids {duplicates[:5]} (names that collide once made safe "
                         f"for file names count too)")
