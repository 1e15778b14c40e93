"""Registry of segmentation heads ("recipes") that share the finetune tasks, splits, data, prediction and metrics.

A recipe says how to build a model on top of a backbone, which kind of samples it trains on, how one training
step goes, and how a whole preprocessed volume is predicted. Everything else — task registry, nnU-Net split,
preprocessing cache, foreground-oversampled sampling + augmentation, optimizer/schedule/AMP/DDP/checkpoints,
resampling back to the original geometry, NIfTI writing, metrics and reports — is common code in `finetune/`.

How a head plugs in
-------------------
1. Write `finetune/heads/<name>.py` exposing a module-level ``RECIPE = HeadRecipe(name="<name>", build_model=...)``
   (only ``build_model`` is required; every other field has a working default listed below).
2. Add `"<name>": "finetune.heads.<name>"` to ``HEAD_MODULES`` below (modules are imported lazily, so a head's
   optional dependencies are only needed when it is selected), or call ``register_head`` at run time.
3. Add `configs/finetune/heads/<name>.yaml`. It is merged over `configs/finetune/base.yaml` + the task config
   by `finetune/run.py --head <name>`, so it may override any key (`data.patch_size`, `optim.*`, `train.*`,
   `infer.*`) and should hold the head's own hyperparameters under ``head:``. It declares every key the head reads
   (the loader refuses others; a head's typed settings refuse a YAML key they do not know).

Data contract (what the common code hands to a recipe)
------------------------------------------------------
Preprocessed volumes are axial-first float32 arrays ``[Z, Y, X]`` (CT-normalised, at the target in-plane
spacing, z untouched, as nnU-Net 2-D does), labels uint8 ``[Z, Y, X]``. The sampler (`finetune.data`) builds
batches according to ``recipe.sampling``:

- ``"slice2d"``: ``image [B, 1 + 2*context, H, W]`` float (the axial slice, with ``data.context_slices`` neighbours
  on each side as extra channels — 2.5-D stacking, edge slices replicated), ``label [B, H, W]`` int64 of the
  centre slice. ``H, W = plans.patch_size`` (``data.patch_size`` when the plans were made, `finetune.preprocess.Plans`).
- ``"slab3d"``: ``image [B, 1, D, H, W]``, ``label [B, D, H, W]`` with ``D = data.slab_depth`` consecutive slices.

Both use nnU-Net foreground oversampling (``data.oversample_foreground``) and the nnU-Net default augmentations
(in-plane rotation/scaling applied identically to every slice of a sample, mirroring, noise, blur,
brightness, contrast, low-resolution simulation, gamma; see `finetune/augment.py`).
Batches are dicts: ``{"image": Tensor, "label": Tensor, "case_ids": list[str]}`` already on the device.

Recipe fields (see ``HeadRecipe``)
----------------------------------
- ``build_model(cfg, n_classes) -> nn.Module``: builds the backbone itself (use ``finetune.heads.common
  .build_backbone_from_cfg(cfg)``, which honours ``--checkpoint``/``model.init``/drop path/LayerScale) and the head.
  ``model(image) -> logits`` with ``[B, n_classes, H, W]`` (slice2d) or ``[B, n_classes, D, H, W]`` (slab3d).
  Models that expose their encoder as ``model.backbone`` get encoder/decoder learning rates for free.
- ``sampling``: ``"slice2d"`` or ``"slab3d"`` (see above).
- ``param_groups(model, cfg) -> list[dict]``: optimizer groups, each with ``params``, ``lr``, ``weight_decay``.
  Default: ``model.backbone`` params at the encoder lr, everything else at the decoder lr, frozen params
  (``requires_grad=False``) left out.
- ``build_loss(cfg) -> loss_fn(logits, label) -> scalar``. Default: nnU-Net Dice + CE (``cfg.loss``).
- ``training_step(model, batch, loss_fn, cfg) -> (loss, logits)``: forward + loss, no backward (the common loop
  does AMP, backward, clipping, the optimizer step). Default: ``logits = model(batch["image"])``.
- ``predict_volume(model, volume, cfg, plans) -> logits``: ``volume [Z, Y, X]`` float tensor (preprocessed, on the
  model's device) -> class logits ``[n_classes, Z, Y, X]`` on CPU (any float dtype; a head that fuses
  probabilities returns their log). They are resampled to the original grid as logits, then argmaxed (nnU-Net).
  Default: slice by slice with in-plane Gaussian sliding windows (step ``infer.step``) and optional mirroring
  (`finetune.infer`); with the default, prediction streams slice batches (``HeadRecipe.streams_slices``).
- ``fit``: optional full replacement of the training loop for multi-stage recipes, called as
  ``fit(cfg, recipe, train_cases, val_cases, output_dir, plans) -> nn.Module``; it may call
  ``finetune.train.fit`` several times with different configs/models (e.g. stage I then stage II).
- ``extra_state(model) / load_extra_state``: not needed — the whole ``model.state_dict()`` is saved and
  `finetune/predict.py` rebuilds the model with ``build_model(cfg, n_classes)`` from the saved config before
  loading it, so ``build_model`` must not need the original weight files when ``model.init == "none"``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

SAMPLING_MODES = ("slice2d", "slab3d")

# name -> module holding a ``RECIPE``. Heads owned by the heads engineer are listed here so they are
# selectable as soon as their module exists.
HEAD_MODULES: dict[str, str] = {
    "primus": "finetune.heads.primus",
    "mvr": "finetune.heads.mvr",
    "med3d": "finetune.heads.med3d",
    "window3d": "finetune.heads.window3d",
}


def _default_param_groups(model: nn.Module, cfg) -> list[dict]:
    from finetune.heads.common import encoder_decoder_param_groups

    return encoder_decoder_param_groups(model, cfg)


def _default_build_loss(cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from finetune.losses import build_loss

    return build_loss(cfg)


def _default_training_step(model: nn.Module, batch: dict, loss_fn: Callable, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["image"])
    return loss_fn(logits, batch["label"]), logits


def _default_predict_volume(model: nn.Module, volume: torch.Tensor, cfg, plans) -> torch.Tensor:
    from finetune.infer import SlidingWindow, predict_volume_slicewise

    return predict_volume_slicewise(model, volume, SlidingWindow.from_config(cfg, plans))


@dataclass(frozen=True)
class HeadRecipe:
    """How one head trains and predicts inside the common finetune pipeline (see the module docstring)."""

    name: str
    build_model: Callable[..., nn.Module]
    sampling: str = "slice2d"
    param_groups: Callable[[nn.Module, object], list[dict]] = _default_param_groups
    build_loss: Callable[[object], Callable] = _default_build_loss
    training_step: Callable[..., tuple[torch.Tensor, torch.Tensor]] = _default_training_step
    predict_volume: Callable[[nn.Module, torch.Tensor, object, object], torch.Tensor] = _default_predict_volume
    fit: Optional[Callable[..., nn.Module]] = None
    description: str = field(default="")

    @property
    def streams_slices(self) -> bool:
        """True when the common slice-wise predictor is used: `finetune.infer.predict_case` then streams slice
        batches back to the original grid instead of holding the whole volume's logits."""
        return self.predict_volume is _default_predict_volume

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"head {self.name!r}: sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")


def register_head(name: str, module: str) -> None:
    """Make ``--head name`` resolve to ``module.RECIPE`` (for heads living outside this package)."""
    HEAD_MODULES[name] = module


def available_heads() -> list[str]:
    return sorted(HEAD_MODULES)


def get_recipe(name: str) -> HeadRecipe:
    """Import the head's module and return its ``RECIPE``; unknown names and missing modules fail clearly."""
    if name not in HEAD_MODULES:
        raise KeyError(f"unknown head {name!r}; available: {', '.join(available_heads())} "
                       "(or register one with finetune.heads.register_head)")
    try:
        module = importlib.import_module(HEAD_MODULES[name])
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"head {name!r}: module {HEAD_MODULES[name]} could not be imported ({err})") from err
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, HeadRecipe):
        raise TypeError(f"head {name!r}: {HEAD_MODULES[name]} must define RECIPE = HeadRecipe(...)")
    return recipe
