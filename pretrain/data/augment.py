"""Multi-crop augmentation on tensors (DINOv2/v3 recipe adapted to grey-scale CT).

Per slice: ``n_global`` random-resized crops (scale 0.32-1) and ``n_local`` (0.05-0.32), each a bicubic
resample of a random box of the HU slice, a random flip, the HU -> input transform, then CT-sensible
photometric augmentation (intensity scale/shift, Gaussian blur, Gaussian noise); no colour jitter or solarize.
The Gram-teacher view is the same box (and flip, window and photometric draw) at a higher resolution.
Everything works on a single channel until the batch is stacked, and all randomness comes from the
generators passed in, so a batch is a pure function of its seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.data.transforms import HUTransform


@dataclass(frozen=True)
class MultiCropParams:
    """Augmentation parameters from the ``crops`` and ``augment`` config blocks (sizes are chosen per batch)."""

    n_global: int
    n_local: int
    global_scale: tuple[float, float]
    local_scale: tuple[float, float]
    aspect_ratio: tuple[float, float]
    gram_no_distortions: bool
    hflip_p: float
    vflip_p: float
    antialias: bool
    intensity_p: float
    intensity_scale: tuple[float, float]
    intensity_shift: tuple[float, float]
    blur_global_p: tuple[float, ...]
    blur_local_p: float
    blur_sigma: tuple[float, float]
    blur_kernel_size: int
    noise_p: float
    noise_std: tuple[float, float]

    @classmethod
    def from_config(cls, crops, augment) -> "MultiCropParams":
        pair = lambda v: (float(v[0]), float(v[1]))  # noqa: E731
        out = cls(
            n_global=int(crops.global_crops_number),
            n_local=int(crops.local_crops_number),
            global_scale=pair(crops.global_crops_scale),
            local_scale=pair(crops.local_crops_scale),
            aspect_ratio=pair(crops.aspect_ratio),
            gram_no_distortions=bool(crops.gram_teacher_no_distortions),
            hflip_p=float(augment.horizontal_flip_p),
            vflip_p=float(augment.vertical_flip_p),
            antialias=bool(augment.antialias),
            intensity_p=float(augment.intensity.p),
            intensity_scale=pair(augment.intensity.scale),
            intensity_shift=pair(augment.intensity.shift),
            blur_global_p=tuple(float(p) for p in augment.blur.global_p),
            blur_local_p=float(augment.blur.local_p),
            blur_sigma=pair(augment.blur.sigma),
            blur_kernel_size=int(augment.blur.kernel_size),
            noise_p=float(augment.noise.p),
            noise_std=pair(augment.noise.std),
        )
        if len(out.blur_global_p) != out.n_global:
            raise ValueError(
                f"augment.blur.global_p needs one probability per global crop ({out.n_global}), "
                f"got {list(out.blur_global_p)}"
            )
        if out.blur_kernel_size % 2 != 1:
            raise ValueError(f"augment.blur.kernel_size must be odd, got {out.blur_kernel_size}")
        return out


def sample_crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random box covering ``scale`` of the area with aspect w/h in ``ratio``.

    The RandomResizedCrop rule: 10 attempts at (area, log-uniform aspect); otherwise the largest centred box
    with the aspect clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resample(image: Tensor, size: int, antialias: bool, box: tuple[int, int, int, int] | None = None) -> Tensor:
    """Bicubic resample of ``image`` [C, H, W] (or of its ``box``) to [C, size, size], align_corners=False."""
    if box is not None:
        top, left, h, w = box
        image = image[:, top : top + h, left : left + w]
    if image.shape[-2:] == (size, size):
        return image.clone()
    return F.interpolate(
        image.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False, antialias=antialias
    ).squeeze(0)


def _gaussian_kernel(sigma: float, kernel_size: int) -> Tensor:
    radius = kernel_size // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


_CONV_BLUR_MAX_PIXELS = 128 * 128  # above this, CPU conv2d with a 1-channel 9-tap kernel is the slow path


def gaussian_blur(x: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Separable Gaussian blur of [C, H, W] with reflect padding (torchvision's GaussianBlur semantics).

    Small crops use conv2d; large ones a sum of shifted slices (same arithmetic, measured ~3x faster on CPU
    for 224 px and up).
    """
    c, h, w = x.shape
    kernel = _gaussian_kernel(sigma, kernel_size).to(x.dtype)
    pad = kernel_size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    padded = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode=mode)
    if h * w <= _CONV_BLUR_MAX_PIXELS:
        y = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
        return F.conv2d(y, kernel.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c).squeeze(0)
    padded = padded.squeeze(0)
    taps = kernel.tolist()
    rows = padded[:, :, 0:w] * taps[0]
    for i in range(1, kernel_size):
        rows.add_(padded[:, :, i : i + w], alpha=taps[i])
    out = rows[:, 0:h, :] * taps[0]
    for i in range(1, kernel_size):
        out.add_(rows[:, i : i + h, :], alpha=taps[i])
    return out


@dataclass(frozen=True)
class PhotometricDraw:
    """One crop's photometric draw, shared by a global crop and its Gram-teacher view."""

    scale: float | None
    shift: float
    blur_sigma: float | None
    noise_std: float | None
    noise_seed: int


def draw_photometric(params: MultiCropParams, blur_p: float, rng: np.random.Generator) -> PhotometricDraw:
    """Always consumes the same number of draws, so switching an augmentation off leaves the crop boxes alone."""
    u_intensity, u_blur, u_noise = rng.random(3)
    scale = rng.uniform(*params.intensity_scale)
    shift = rng.uniform(*params.intensity_shift)
    sigma = rng.uniform(*params.blur_sigma)
    noise_std = rng.uniform(*params.noise_std)
    noise_seed = int(rng.integers(0, 2**62))
    intensity = u_intensity < params.intensity_p
    return PhotometricDraw(
        scale=scale if intensity else None,
        shift=shift if intensity else 0.0,
        blur_sigma=sigma if u_blur < blur_p else None,
        noise_std=noise_std if u_noise < params.noise_p else None,
        noise_seed=noise_seed,
    )


def apply_photometric(x: Tensor, draw: PhotometricDraw, params: MultiCropParams) -> Tensor:
    """Intensity scale/shift (in normalised units), blur, additive Gaussian noise; [C, H, W] -> [C, H, W]."""
    if draw.scale is not None:
        x = x * draw.scale + draw.shift
    if draw.blur_sigma is not None:
        x = gaussian_blur(x, draw.blur_sigma, params.blur_kernel_size)
    if draw.noise_std is not None:
        gen = torch.Generator().manual_seed(draw.noise_seed)
        x = x + draw.noise_std * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


def _flip(x: Tensor, hflip: bool, vflip: bool) -> Tensor:
    dims = ([-1] if hflip else []) + ([-2] if vflip else [])
    return x.flip(dims) if dims else x


def _crop(
    image: Tensor,
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    params: MultiCropParams,
    transform: HUTransform,
    rng: np.random.Generator,
    gram_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One crop of ``image`` [1, H, W] -> ([C, size, size], optional Gram view [C, gram_size, gram_size])."""
    box = sample_crop_box(image.shape[-2], image.shape[-1], scale, params.aspect_ratio, rng)
    hflip, vflip = rng.random() < params.hflip_p, rng.random() < params.vflip_p
    window = transform.sample_window(rng)
    draw = draw_photometric(params, blur_p, rng)

    def view(out_size: int) -> Tensor:
        return transform.finish_crop(_flip(resample(image, out_size, params.antialias, box), hflip, vflip)[0], window)

    if gram_size is None:
        return apply_photometric(view(size), draw, params), None
    if params.gram_no_distortions:
        return apply_photometric(view(size), draw, params), view(gram_size)
    # DINOv3 order: distort the large view, then downsample it for the student
    big = apply_photometric(view(max(size, gram_size)), draw, params)
    small = resample(big, size, params.antialias)
    return small, (big if gram_size >= size else resample(big, gram_size, params.antialias))


def multi_crop(
    slice_: Tensor,
    global_size: int,
    local_size: int,
    gram_size: int | None,
    params: MultiCropParams,
    transform: HUTransform,
    rng: np.random.Generator,
) -> dict[str, list[Tensor]]:
    """All crops of one slice.

    Args:
        hu: [H, W] float32 slice from ``transform.prepare_slice``.
        global_size, local_size, gram_size: output sides in pixels for this batch (gram_size None: no Gram view).

    Returns:
        ``global_crops`` (n_global x [C, G, G]), ``local_crops`` (n_local x [C, L, L]) and, with a Gram view,
        ``gram_teacher_crops`` (n_global x [C, G2, G2]); C is 1 for the repeated-channel transforms.
    """
    image = slice_.unsqueeze(0)
    global_crops, gram_crops = [], []
    for i in range(params.n_global):
        crop, gram = _crop(
            image, global_size, params.global_scale, params.blur_global_p[i], params, transform, rng, gram_size
        )
        global_crops.append(crop)
        gram_crops.append(gram)
    local_crops = [
        _crop(image, local_size, params.local_scale, params.blur_local_p, params, transform, rng)[0]
        for _ in range(params.n_local)
    ]
    out = {"global_crops": global_crops, "local_crops": local_crops}
    if gram_size is not None:
        out["gram_teacher_crops"] = gram_crops
    return out
