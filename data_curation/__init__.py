"""CT-3M curation: public CT datasets (NIfTI, DICOM) -> axial-slice webdataset shards with a manifest."""
