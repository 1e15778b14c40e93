"""Whole-volume inference speed on CPU: slices/s at 224 and 448 px slices, and where the time goes.

    python benchmarks/inference.py [--arch vits16] [--ct data_curation/sample_ct/msd_spleen/sub-spleen2_ct.nii.gz]
        [--sizes 224 448] [--threads 2] [--mirror]

For each size the real CT is planned so that its slice becomes ``size`` px (``preprocess.target_slice_px``) and the
Primus multi-scale model (random weights: speed does not depend on them) predicts the whole volume through the
product path (`finetune.infer.predict_case`: crop/normalise/resample in -> slice-wise Gaussian sliding windows ->
resample back + argmax). Time is split into backbone (ViT ``get_intermediate_layers``, wrapped), decoder (forward hook;
transposed-conv upsampler), resampling in/out (`finetune.preprocess`), and the rest (window bookkeeping, softmax).
Ratios are printed against the 224 px run measured in the same process.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch
from omegaconf import OmegaConf

import finetune.infer as infer_mod
import finetune.preprocess as pre
from finetune.config import load_config
from finetune.heads import get_recipe
from finetune.preprocess import Plans, read_volume

REPO = Path(__file__).resolve().parents[1]


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)
        return wrapped


def hook_module(module: torch.nn.Module, timer: Timer, name: str) -> None:
    start: dict[str, float] = {}
    module.register_forward_pre_hook(lambda m, i: start.__setitem__("t", time.perf_counter()))
    module.register_forward_hook(lambda m, i, o: timer.seconds.__setitem__(
        name, timer.seconds.get(name, 0.0) + time.perf_counter() - start["t"]))


def run_size(size: int, args, image) -> dict:
    task_dir = REPO / "benchmarks"  # any folder: the generic task only needs a name here
    cfg = load_config(str(task_dir), "primus", [], [f"model.arch={args.arch}", "model.init=random",
                                                    f"data.patch_size=[{size},{size}]", f"infer.mirror={args.mirror}",
                                                    f"infer.batch_size={args.batch}", "infer.precision=fp32"])
    cfg.task.class_names = ["background", *[f"class_{i}" for i in range(1, args.classes)]]
    recipe = get_recipe("primus")
    torch.manual_seed(0)
    model = recipe.build_model(cfg, args.classes).eval()
    spacing = image.spacing_zyx[1:]
    scale = max(image.array.shape[1:]) / size
    plans = Plans(target_spacing_yx=[spacing[0] * scale, spacing[1] * scale], clip_low=-160.0, clip_high=240.0,
                  mean=60.0, std=50.0, labels=list(cfg.task.class_names))
    timer = Timer()
    model.backbone.get_intermediate_layers = timer.wrap(model.backbone.get_intermediate_layers, "backbone")
    hook_module(model.decoder, timer, "decoder")
    originals = (pre.resample_image_inplane, pre.resample_logits_inplane)
    pre.resample_image_inplane = timer.wrap(originals[0], "resample_in")
    pre.resample_logits_inplane = timer.wrap(originals[1], "resample_out")
    try:
        with torch.inference_mode():
            infer_mod.predict_case(model, recipe, image, plans, cfg, torch.device("cpu"))  # warm-up
            timer.seconds.clear()
            t0 = time.perf_counter()
            infer_mod.predict_case(model, recipe, image, plans, cfg, torch.device("cpu"))
            total = time.perf_counter() - t0
    finally:
        pre.resample_image_inplane, pre.resample_logits_inplane = originals
    n_slices = image.array.shape[0]
    shares = {k: v / total for k, v in timer.seconds.items()}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {"size": size, "seconds": total, "slices_per_s": n_slices / total, "shares": shares}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--ct", default=str(REPO / "data_curation" / "sample_ct" / "msd_spleen" / "sub-spleen2_ct.nii.gz"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--mirror", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = read_volume(args.ct)
    print(f"CT {args.ct}: {image.array.shape[0]} slices of {image.array.shape[1]}x{image.array.shape[2]}; arch {args.arch}, "
          f"{args.classes} classes, mirror={args.mirror}, {args.threads} threads")
    results = [run_size(s, args, image) for s in args.sizes]
    base = results[0]
    print(f"{'size':>5} {'s/volume':>9} {'slices/s':>9} {'vs ' + str(base['size']):>8}  "
          f"{'backbone':>8} {'decoder':>8} {'resamp.in':>9} {'resamp.out':>10} {'other':>6}")
    for r in results:
        sh = r["shares"]
        print(f"{r['size']:>5} {r['seconds']:9.2f} {r['slices_per_s']:9.2f} {r['slices_per_s'] / base['slices_per_s']:8.2f}x "
              f"{sh.get('backbone', 0):8.1%} {sh.get('decoder', 0):8.1%} {sh.get('resample_in', 0):9.1%} "
              f"{sh.get('resample_out', 0):10.1%} {sh['other']:6.1%}")
    return results


if __name__ == "__main__":
    main()
