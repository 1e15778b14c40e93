"""Cross-source de-duplication: the same scan is redistributed by several datasets (LiTS ~ MSD Liver;
AbdomenCT-1K and AbdomenAtlas contain MSD/KiTS/NIH cases), in different dtypes, orientations and compressions.

A fingerprint is computed on the canonical LPS HU volume (so orientation and storage dtype no longer matter):
the canonical shape, the physical extent in mm, and a coarse descriptor -- HU clipped to ``[-1024, 2000]``,
block-averaged to ``grid`` (default 16x16x16). Two volumes are duplicates when their shapes and extents match and
the descriptors differ by less than ``max_mean_abs_diff_hu`` on average (lossy re-compression and float/int
rounding move block means by far less than 1 HU; different patients differ by tens of HU).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np


@dataclass
class Fingerprint:
    uid: str
    shape: tuple[int, int, int]
    extent_mm: tuple[float, float, float]
    descriptor: np.ndarray  # float32 [gz, gy, gx]

    def as_dict(self) -> dict:
        """JSON-ready; the descriptor as base64 of little-endian float32 (a 16^3 grid is 4096 numbers per volume:
        as JSON floats they cost milliseconds to write and parse in the state file, as base64 microseconds)."""
        desc = np.ascontiguousarray(self.descriptor, dtype="<f4")
        return {"uid": self.uid, "shape": list(self.shape), "extent_mm": [round(e, 3) for e in self.extent_mm],
                "descriptor_f4_b64": base64.b64encode(desc.tobytes()).decode("ascii"), "grid": list(desc.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "Fingerprint":
        desc = np.frombuffer(base64.b64decode(d["descriptor_f4_b64"]), dtype="<f4").astype(np.float32).reshape(d["grid"])
        return cls(d["uid"], tuple(d["shape"]), tuple(d["extent_mm"]), desc)


def slice_descriptors(slices: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """``[N, H, W]`` int16 HU -> ``[N, gh, gw]`` float32 block means of HU clipped to [-1024, 2000]."""
    import torch
    import torch.nn.functional as F

    # every ``step``-th pixel is plenty for block means of a 16x16 grid and keeps this off the critical path
    step = max(1, min(slices.shape[1] // (grid_hw[0] * 8), slices.shape[2] // (grid_hw[1] * 8)))
    x = slices[:, ::step, ::step].astype(np.float32)
    np.clip(x, -1024, 2000, out=x)
    return F.adaptive_avg_pool2d(torch.from_numpy(x).unsqueeze(1), grid_hw).squeeze(1).numpy()


def volume_fingerprint(uid: str, per_slice: np.ndarray, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float], grid_z: int) -> Fingerprint:
    """Combine per-slice descriptors ``[Z, gh, gw]`` (all slices, canonical order) into a volume fingerprint."""
    z = per_slice.shape[0]
    bins = np.array_split(np.arange(z), min(grid_z, z))
    desc = np.stack([per_slice[b].mean(axis=0) for b in bins]).astype(np.float32)
    if desc.shape[0] < grid_z:  # very short volumes: pad the grid so every descriptor has one shape
        desc = np.concatenate([desc, np.repeat(desc[-1:], grid_z - desc.shape[0], axis=0)])
    extent = tuple(float(n * s) for n, s in zip(shape, spacing_zyx))
    return Fingerprint(uid, tuple(int(s) for s in shape), extent, desc)


def find_duplicates(fingerprints: list[Fingerprint], priority: list[str], max_mean_abs_diff_hu: float, extent_rel_tol: float) -> list[dict]:
    """Return one record per dropped volume: ``{dropped, kept, mean_abs_diff_hu, reason}``.

    Candidates are bucketed by canonical shape (reorientation only permutes axes, so shapes match). The copy kept
    is the one whose source comes first in ``priority`` (ties: smallest uid), which makes the result independent of
    processing order.
    """
    rank = {name: i for i, name in enumerate(priority)}

    def order(fp: Fingerprint):
        return (rank.get(fp.uid.split("/", 1)[0], len(rank)), fp.uid)

    buckets: dict[tuple, list[Fingerprint]] = {}
    for fp in sorted(fingerprints, key=order):
        buckets.setdefault(fp.shape, []).append(fp)
    dropped: list[dict] = []
    for members in buckets.values():
        kept: list[Fingerprint] = []
        for fp in members:
            match = None
            for k in kept:
                if all(abs(a - b) <= extent_rel_tol * max(a, b) for a, b in zip(fp.extent_mm, k.extent_mm)):
                    diff = float(np.abs(fp.descriptor - k.descriptor).mean())
                    if diff < max_mean_abs_diff_hu:
                        match = (k, diff)
                        break
            if match is None:
                kept.append(fp)
            else:
                dropped.append({"dropped": fp.uid, "kept": match[0].uid, "mean_abs_diff_hu": round(match[1], 3),
                                "reason": "same scan (shape, extent and HU fingerprint match)"})
    return sorted(dropped, key=lambda d: d["dropped"])
