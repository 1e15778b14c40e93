"""The DINOv3 backbone and its checkpoint I/O (the only package other packages import from ``pretrain``).

``build_backbone(arch, **overrides)`` builds a preset; ``load_backbone(path)`` loads any supported
checkpoint format (official DINOv3, MedDINOv3 release, training checkpoints, Hugging Face directory,
timm's DINOv3 weights, our safetensors export); ``save_backbone(model, path)`` writes safetensors with the architecture.
"""
from .arch_inference import infer_arch
from .checkpoint import detect_format, load_backbone, save_backbone
from .checkpoint_files import CheckpointError
from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer, ViTConfig, build_backbone

__all__ = [
    "ARCH_PRESETS",
    "CheckpointError",
    "DinoVisionTransformer",
    "ViTConfig",
    "build_backbone",
    "detect_format",
    "infer_arch",
    "load_backbone",
    "save_backbone",
]
