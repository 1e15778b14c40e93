"""Generic ``folder`` source: any tree of NIfTI files and/or DICOM series (users' own CT).

Every ``*.nii``/``*.nii.gz`` whose name does not match ``options["exclude_patterns"]`` (labels, masks) is one case;
every folder that directly holds DICOM files is one DICOM case (series are split by the reader). Case id: the path
relative to the root, with separators and dots turned into ``_``.
"""
import fnmatch
from pathlib import Path

from data_curation.sources.base import SourceAdapter, dicom_case, dicom_dirs, nifti_case, walk_files
from meddino_datasets.case import Case
from meddino_datasets.readers.nifti import NIFTI_SUFFIXES, strip_nifti_suffix


def find(root: Path, options: dict) -> list[Case]:
    excludes = [pat.lower() for pat in options.get("exclude_patterns", [])]
    cases = []
    for path in walk_files(root):
        if path.name.endswith(NIFTI_SUFFIXES) and not any(fnmatch.fnmatch(path.name.lower(), pat) for pat in excludes):
            rel = path.relative_to(root)
            cases.append(nifti_case("folder", path, strip_nifti_suffix(str(rel))))
    for folder, files in dicom_dirs(root).items():
        rel = folder.relative_to(root)
        cases.append(dicom_case("folder", str(rel) if str(rel) != "." else root.name, files))
    return sorted(cases, key=lambda c: c.case_id)


ADAPTER = SourceAdapter("folder", "any tree of *.nii[.gz] (minus label/mask names) and DICOM folders", find)
