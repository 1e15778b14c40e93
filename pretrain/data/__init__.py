"""Pretraining data: CT-3M shards -> HU transform -> multi-crop -> iBOT masks -> crop-major batches.

``build_ssl_loader(cfg, rank=0, world_size=1, start_iter=0)`` is the entry point used by ``pretrain.train``;
it reads the ``data``, ``crops``, ``augment`` and ``masking`` blocks of the pretraining config.
"""
from pretrain.data.loader import SSLBatchSettings, build_batch, build_ssl_loader

__all__ = ["build_ssl_loader", "SSLBatchSettings", "build_batch"]
