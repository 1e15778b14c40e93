"""Self-supervised losses of DINOv3 pretraining (stages 1-3), as plain functions with documented shapes.

``sinkhorn_knopp`` centres teacher outputs; ``dino_loss`` (class tokens), ``ibot_loss`` (masked patches),
``koleo_loss`` (feature spreading) and ``gram_loss`` (Gram anchoring) follow the official DINOv3 definitions.
How the terms are weighted and summed is the trainer's job (``pretrain.train``).
"""
from pretrain.losses.dino import dino_loss
from pretrain.losses.gram import gram_loss, resize_patch_grid
from pretrain.losses.ibot import ibot_loss
from pretrain.losses.koleo import koleo_loss
from pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["sinkhorn_knopp", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss", "resize_patch_grid"]
