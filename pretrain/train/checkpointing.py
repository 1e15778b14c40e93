"""Training checkpoints: atomic, full state, keep-last-K, auto-resume; teacher export in the official format.

A checkpoint is one file ``<output_dir>/checkpoints/checkpoint_<iteration:08d>.pth`` (``iteration`` = number of
completed iterations) holding::

    {"iteration": int, "student": {...}, "teacher": {...}, "gram_teacher": {...} | None,
     "optimizer": optimizer state, "loader": {"batches_consumed": int}, "rng": [per-rank RNG states],
     "gram": {"initialized": bool, "refreshes_done": int}, "config": resolved YAML text, "format": "meddinov3-ssl-1"}

``student`` / ``teacher`` keys are ``backbone.<official DINOv3 key>``, ``dino_head.*``, ``ibot_head.*`` (the layout
of DINOv3's own training checkpoints). Files are written to a temporary name and renamed, so a crash never leaves
a half-written checkpoint under the final name; everything is read back with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8})\.pth$")
FORMAT = "meddinov3-ssl-1"


def checkpoint_path(ckpt_dir: str | Path, iteration: int) -> Path:
    return Path(ckpt_dir) / f"checkpoint_{iteration:08d}.pth"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every complete checkpoint, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1][1] if ckpts else None


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted paths."""
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - max(1, int(keep_last)))]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    npd = state["numpy"]
    np.random.set_state(
        (npd["name"], npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"], npd["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    if isinstance(x, (list, tuple)):
        return tuple(_to_tuple(v) for v in x)
    return x


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (``weights_only=True``) with a clear error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pretrain.train checkpoint (format {FORMAT!r} expected)")
    return state


def find_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """``resume``: None/``"none"`` -> no resume; ``"auto"`` -> newest checkpoint in ``output_dir/checkpoints``
    (None when there is none yet: a fresh start); anything else -> that file (must exist)."""
    if resume in (None, "", "none", "no", "false"):
        return None
    if resume == "auto":
        return latest_checkpoint(Path(output_dir) / "checkpoints")
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def teacher_backbone_state(ckpt: dict) -> dict:
    """Flat official-layout backbone state dict of the EMA teacher in a loaded checkpoint."""
    return strip_prefix(ckpt["teacher"], "backbone.")


def export_backbone(state_dict: dict, path: str | Path) -> Path:
    """Write a flat backbone state dict (official DINOv3 ``.pth`` layout, CPU fp32 tensors) atomically."""
    flat = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    return atomic_save(flat, path)
