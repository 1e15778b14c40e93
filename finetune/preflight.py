"""``python -m finetune.preflight --out DIR [--tiny] [--head primus] [key=value ...]``: one finetune training step
and one sliding-window inference of a segmentation head at the configured patch size, on real CT, timed.

The finetune half of ``python -m pretrain.preflight`` (which runs it as a separate process, so pretraining never
imports finetuning): it builds the demo's three-case spleen dataset from the embedded real CT sample
(:func:`finetune.demo.build_demo_dataset`), plans and preprocesses it exactly as ``finetune/run.py`` does (fold 0),
builds the head's model, runs one optimiser step on a real batch with the configured precision, then predicts
``infer.batch_size`` slices of the validation case with the head's own sliding-window inference. Without
``--tiny`` that is the paper's setting: ViT-B/16, 896 x 896 patches. It prints one JSON object (the last line of
its output): ``ok``, ``error``, ``device``, ``patch_size``, ``train_step_s``, ``inference_s``,
``inference_slices``, ``peak_memory_gb`` (GPU: max allocated, with ``peak_reserved_gb``; CPU: max RSS),
``loss_finite``.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data_curation" / "sample_ct"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict:
    """GPU: max allocated / reserved since the last reset; CPU: the process's max resident set size (GiB)."""
    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_reserved_gb": None}


def run(out: Path, tiny: bool, head: str, overrides: Sequence[str]) -> dict:
    from finetune.config import load_config
    from finetune.data import PatchSampler, load_preprocessed
    from finetune.demo import build_demo_dataset
    from finetune.heads import get_recipe
    from finetune.run import prepare_fold
    from finetune.train import build_optimizer, train_step

    dataset, splits = build_demo_dataset(SAMPLE_DIR, out / "raw")
    cfg = load_config(str(dataset), head, ["tiny.yaml"] if tiny else [],
                      [f"output_dir={out / 'fold_0'}", f"splits_file={splits}", "train.progress=false", *overrides])
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_cases, val_cases, plans, dirs = prepare_fold(cfg)
    recipe = get_recipe(head)
    torch.manual_seed(int(cfg.seed))
    model = recipe.build_model(cfg, len(plans.labels)).to(device)
    optimizer = build_optimizer(model, recipe, cfg)
    loss_fn = recipe.build_loss(cfg)
    precision = str(cfg.train.precision) if device.type == "cuda" else "fp32"
    sampler = PatchSampler([load_preprocessed(dirs[c.case_id]) for c in train_cases], cfg, recipe.sampling,
                           plans.patch_size, int(cfg.seed))
    batch = sampler.batch(0)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    loss, _, _, _ = train_step(model, recipe, batch, loss_fn, cfg, optimizer, scaler, precision, device)
    _sync(device)
    train_step_s = time.perf_counter() - t0
    loss_value = float(loss)

    val_image = load_preprocessed(dirs[val_cases[0].case_id]).image  # memory-mapped [Z, Y, X]
    n_slices = min(int(cfg.infer.batch_size), val_image.shape[0])
    volume = torch.from_numpy(np.array(val_image[:n_slices], dtype=np.float32)).to(device)
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        probs = recipe.predict_volume(model, volume, cfg, plans)
    _sync(device)
    inference_s = time.perf_counter() - t0
    finite = bool(np.isfinite(loss_value)) and bool(torch.isfinite(probs).all())
    return {"ok": finite, "error": None if finite else "non-finite loss or probabilities", "device": str(device),
            "head": head, "patch_size": list(plans.patch_size), "batch_size": int(batch["image"].shape[0]),
            "precision": precision, "train_step_s": train_step_s, "loss": loss_value, "loss_finite": finite,
            "inference_s": inference_s, "inference_slices": n_slices, **peak_memory(device)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python -m finetune.preflight --out DIR [--tiny] [--head primus] [key=value ...]")
    p.add_argument("--out", required=True, help="working folder (dataset, preprocessed cache)")
    p.add_argument("--tiny", action="store_true", help="configs/finetune/tiny.yaml: a tiny ViT and 64 px patches (CPU)")
    p.add_argument("--head", default="primus", help="segmentation head (default: primus, MedDINOv3's decoder)")
    p.add_argument("overrides", nargs="*", help="finetune config overrides, key=value")
    args = p.parse_args(argv)
    try:
        report = run(Path(args.out), args.tiny, args.head, args.overrides)
    except Exception as err:  # noqa: BLE001 - reported as one line in the JSON, the caller decides
        report = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
