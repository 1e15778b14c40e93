"""Segmentation transfer of a pretrained backbone (MedDINOv3 Primus multi-scale and companion readouts)."""
