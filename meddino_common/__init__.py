"""The lowest layer: small helpers every package may import, written once.

``config`` (the one strict config loader), ``atomic`` (atomic file writes), ``seeding`` (one seed-derivation
scheme), ``precision`` (autocast and TF32 switches), ``figures`` (PNG saving). It imports nothing from the
project, so ``data_curation``, ``pretrain``, ``finetune`` and ``meddino_datasets`` can all depend on it without
depending on each other. ``precision`` imports torch and ``figures`` matplotlib, each only when imported.
"""
