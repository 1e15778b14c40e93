"""HU -> model input, applied per crop at training time (shards store raw HU, lossless).

Modes (``data.transform.mode``):
- ``clamp_normalize`` (default, MedDINOv3): clamp to ``hu_clamp`` ([-1000, 1000]), z-score with the CT-3M
  statistics (``mean`` 65.1084, ``std`` 178.0166), one channel repeated to ``n_channels`` (3).
- ``window_set``: one channel per (level, width) window, each mapped to [0, 1] and z-scored with the
  per-channel ``window_mean`` / ``window_std``.
- ``random_window``: like ``clamp_normalize`` but, with probability ``random_window.p``, the clamp window is
  jittered per crop (level shift, log-uniform width scale): a CT-specific intensity augmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_MODES = ("clamp_normalize", "window_set", "random_window")


@dataclass(frozen=True)
class HUTransform:
    """Parameters of the HU -> input mapping (built from ``cfg.data.transform`` by ``from_config``)."""

    mode: str
    hu_clamp: tuple[float, float]
    mean: float
    std: float
    n_channels: int
    windows: tuple[tuple[float, float], ...]
    window_mean: tuple[float, ...]
    window_std: tuple[float, ...]
    random_window_p: float
    level_jitter_hu: float
    width_scale: tuple[float, float]

    @classmethod
    def from_config(cls, cfg) -> "HUTransform":
        """``cfg`` is the ``data.transform`` block."""
        if cfg.mode not in _MODES:
            raise ValueError(f"data.transform.mode must be one of {_MODES}, got {cfg.mode!r}")
        windows = tuple((float(level), float(width)) for level, width in cfg.windows)
        out = cls(
            mode=str(cfg.mode),
            hu_clamp=(float(cfg.hu_clamp[0]), float(cfg.hu_clamp[1])),
            mean=float(cfg.mean),
            std=float(cfg.std),
            n_channels=int(cfg.n_channels),
            windows=windows,
            window_mean=tuple(float(v) for v in cfg.window_mean),
            window_std=tuple(float(v) for v in cfg.window_std),
            random_window_p=float(cfg.random_window.p),
            level_jitter_hu=float(cfg.random_window.level_jitter_hu),
            width_scale=(float(cfg.random_window.width_scale[0]), float(cfg.random_window.width_scale[1])),
        )
        if out.mode == "window_set" and not (len(windows) == len(out.window_mean) == len(out.window_std)):
            raise ValueError("data.transform.windows, window_mean and window_std must have the same length")
        if out.hu_clamp[0] >= out.hu_clamp[1]:
            raise ValueError(f"data.transform.hu_clamp must be increasing, got {out.hu_clamp}")
        return out

    @property
    def out_channels(self) -> int:
        return len(self.windows) if self.mode == "window_set" else self.n_channels

    def preclamp_range(self) -> tuple[float, float]:
        """HU range every crop may use; clamping the slice to it before resampling bounds bicubic overshoot."""
        if self.mode == "window_set":
            return (min(l - w / 2 for l, w in self.windows), max(l + w / 2 for l, w in self.windows))
        if self.mode == "random_window":
            level = (self.hu_clamp[0] + self.hu_clamp[1]) / 2
            half = (self.hu_clamp[1] - self.hu_clamp[0]) / 2 * self.width_scale[1]
            return (level - half - self.level_jitter_hu, level + half + self.level_jitter_hu)
        return self.hu_clamp

    def sample_window(self, rng: np.random.Generator) -> tuple[float, float]:
        """The clamp window of one crop (random only in ``random_window`` mode)."""
        lo, hi = self.hu_clamp
        if self.mode != "random_window" or rng.random() >= self.random_window_p:
            return lo, hi
        level = (lo + hi) / 2 + rng.uniform(-self.level_jitter_hu, self.level_jitter_hu)
        width = (hi - lo) * math.exp(rng.uniform(math.log(self.width_scale[0]), math.log(self.width_scale[1])))
        return level - width / 2, level + width / 2

    def __call__(self, hu: Tensor, window: tuple[float, float] | None = None) -> Tensor:
        """[H, W] float HU -> [C, H, W] float model input (C = 1 for the repeated modes; see ``out_channels``).

        The repeated single channel is returned once; ``expand_channels`` repeats it when batches are stacked.
        """
        if self.mode == "window_set":
            channels = []
            for (level, width), m, s in zip(self.windows, self.window_mean, self.window_std):
                unit = (hu.clamp(level - width / 2, level + width / 2) - (level - width / 2)) / width
                channels.append((unit - m) / s)
            return torch.stack(channels)
        lo, hi = window if window is not None else self.hu_clamp
        return ((hu.clamp(lo, hi) - self.mean) / self.std).unsqueeze(0)

    def prepare_slice(self, hu: np.ndarray) -> Tensor:
        """int16 HU [H, W] -> float32 [H, W] ready for cropping.

        ``clamp_normalize`` maps the whole slice to model units here, once: bicubic resampling is linear with
        weights summing to 1, so z-scoring before or after it is the same, and it saves one pass per crop.
        The other modes only clamp to ``preclamp_range`` (their mapping depends on the crop's window).
        """
        x = torch.from_numpy(hu.astype(np.float32))
        if self.mode == "clamp_normalize":
            return x.clamp_(*self.hu_clamp).sub_(self.mean).div_(self.std)
        return x.clamp_(*self.preclamp_range())

    def finish_crop(self, crop: Tensor, window: tuple[float, float] | None = None) -> Tensor:
        """Resampled crop [S, S] of ``prepare_slice`` output -> [C, S, S] model input.

        For ``clamp_normalize`` only the bicubic overshoot is clamped back into the normalised HU window.
        """
        if self.mode == "clamp_normalize":
            lo, hi = self.hu_clamp
            return crop.clamp_((lo - self.mean) / self.std, (hi - self.mean) / self.std).unsqueeze(0)
        return self(crop, window)

    def expand_channels(self, x: Tensor) -> Tensor:
        """[n, 1 or C, H, W] -> [n, out_channels, H, W]; one repeated channel becomes a stride-0 view."""
        return x.expand(-1, self.out_channels, -1, -1) if x.shape[1] == 1 else x
