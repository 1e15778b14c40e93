"""The DINOv3 backbone and its checkpoint I/O (the only package other packages import from ``pretrain``).

``build_backbone(arch, **overrides)`` builds a preset; ``load_backbone(path)`` loads any supported
checkpoint format (official DINOv3, MedDINOv3 release, training checkpoints, Hugging Face directory,
our safetensors export); ``save_backbone(model, path)`` writes safetensors with the architecture.
"""
from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer, ViTConfig, build_backbone

__all__ = ["ARCH_PRESETS", "DinoVisionTransformer", "ViTConfig", "build_backbone"]
