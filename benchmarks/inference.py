"""Whole-volume inference on CPU: slices/s at 224 and 448 px slices and where the time goes; then, at 896 px (the
paper's slices), peak memory and speed of the streaming path against the previous whole-volume path.

    python benchmarks/inference.py [--arch vits16] [--ct data_curation/sample_ct/msd_spleen/sub-spleen2_ct.nii.gz]
        [--sizes 224 448] [--threads 2] [--mirror] [--compare-size 896] [--compare-arch vitt16]

For each size the real CT is planned so that its slice becomes ``size`` px (``preprocess.target_slice_px``) and the
Primus multi-scale model (random weights: speed does not depend on them) predicts the whole volume through the
product path (`finetune.infer.predict_case`: crop/normalise/resample in -> slice-wise Gaussian sliding windows ->
resample back + argmax). Time is split into backbone (ViT ``get_intermediate_layers``, wrapped), decoder (forward hook;
transposed-conv upsampler), resampling in/out (`finetune.preprocess`), and the rest (window bookkeeping, softmax).
Ratios are printed against the 224 px run measured in the same process.

Memory at ``--compare-size`` (896): each path runs in its own fresh process (peak RSS is per process), on the same
CT, model and plans: ``old`` = the previous product path, kept here as the baseline (softmax probabilities of the
whole volume held in float32, ``[K, Z, Y', X']`` plus its permuted copy, then resampled back); ``new`` =
`finetune.infer.predict_case` (slice batches streamed back to the original grid as logits). Printed: peak RSS,
its increase over the process's RSS before the prediction, slices/s, and new/old ratios. ``--compare-size 0`` skips it.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

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


def setup(size: int, arch: str, args, image):
    """Config, recipe, random-weight Primus model and plans that make the CT's slice ``size`` px."""
    task_dir = REPO / "benchmarks"  # any folder: the generic task only needs a name here
    cfg = load_config(str(task_dir), "primus", [], [f"model.arch={arch}", "model.init=random",
                                                    f"data.patch_size=[{size},{size}]", f"infer.mirror={args.mirror}",
                                                    f"infer.batch_size={args.batch}", "infer.precision=fp32"])
    recipe = get_recipe("primus")
    torch.manual_seed(0)
    model = recipe.build_model(cfg, args.classes).eval()
    spacing = image.spacing_zyx[1:]
    scale = max(image.array.shape[1:]) / size
    plans = Plans(target_spacing_yx=[spacing[0] * scale, spacing[1] * scale], clip_low=-160.0, clip_high=240.0,
                  mean=60.0, std=50.0, labels=["background", *[f"class_{i}" for i in range(1, args.classes)]],
                  patch_size=[size, size])
    return cfg, recipe, model, plans


def old_predict_case(model, recipe, image, plans: Plans, cfg, device):
    """The previous product path, the memory baseline: every slice batch's logits softmaxed to float32 probabilities,
    the whole volume concatenated ``[Z, K, Y', X']``, permuted to a contiguous ``[K, Z, Y', X']`` copy, then
    resampled back and argmaxed in chunks of 16 slices."""
    arr, _, props = pre.preprocess_volume(image, plans)
    volume = torch.from_numpy(arr).to(device)
    chunks = [torch.softmax(logits, 0).permute(1, 0, 2, 3).cpu()
              for _, logits in infer_mod.iter_slicewise_logits(model, volume,
                                                               infer_mod.SlidingWindow.from_config(cfg, plans))]
    probs = torch.cat(chunks, 0).permute(1, 0, 2, 3).contiguous()
    del chunks
    return pre.restore_geometry(probs, props)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def memory_worker(path: str, args) -> dict:
    """One prediction of the whole CT by ``path`` (old | new) in this fresh process: peak RSS and time."""
    image = read_volume(args.ct)
    cfg, recipe, model, plans = setup(args.compare_size, args.compare_arch, args, image)
    predict = old_predict_case if path == "old" else infer_mod.predict_case
    before = _rss_mb()
    t0 = time.perf_counter()
    with torch.inference_mode():
        label = predict(model, recipe, image, plans, cfg, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "seconds": seconds, "slices_per_s": image.array.shape[0] / seconds, "peak_rss_mb": peak,
            "rss_before_mb": before, "increase_mb": peak - before, "foreground_voxels": int((label > 0).sum())}


def compare_memory(args) -> dict:
    """Old vs new path at ``--compare-size``, each in its own process; returns both results and the ratios."""
    results = {}
    for path in ("old", "new"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--ct", args.ct, "--threads",
               str(args.threads), "--batch", str(args.batch), "--classes", str(args.classes),
               "--compare-size", str(args.compare_size), "--compare-arch", args.compare_arch] + \
              (["--mirror"] if args.mirror else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    old, new = results["old"], results["new"]
    if old["foreground_voxels"] != new["foreground_voxels"]:
        print(f"note: the two paths labelled {old['foreground_voxels']} vs {new['foreground_voxels']} foreground voxels "
              "(logits vs probabilities resampled back: boundary voxels may differ)")
    ratios = {"peak_rss": new["peak_rss_mb"] / old["peak_rss_mb"], "increase": new["increase_mb"] / old["increase_mb"],
              "speed": new["slices_per_s"] / old["slices_per_s"]}
    print(f"\n{args.compare_size} px, {args.compare_arch}, {args.classes} classes: peak RSS and speed, one process per path")
    print(f"{'path':>5} {'peak RSS MB':>12} {'increase MB':>12} {'slices/s':>9}")
    for r in (old, new):
        print(f"{r['path']:>5} {r['peak_rss_mb']:12.0f} {r['increase_mb']:12.0f} {r['slices_per_s']:9.3f}")
    print(f"new/old: peak RSS {ratios['peak_rss']:.2f}x, increase over the pre-prediction RSS {ratios['increase']:.2f}x, "
          f"slices/s {ratios['speed']:.2f}x")
    return {"old": old, "new": new, "ratios": ratios}


def run_size(size: int, args, image) -> dict:
    cfg, recipe, model, plans = setup(size, args.arch, args, image)
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
    parser.add_argument("--compare-size", type=int, default=896, help="slice size of the old/new memory comparison (0: skip)")
    parser.add_argument("--compare-arch", default="vitt16", help="backbone of the memory comparison (memory is in the "
                        "class scores, not the model: a small backbone keeps the 896 px run short on a CPU)")
    parser.add_argument("--worker", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args.worker, args)))
        return []
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
    if args.compare_size:
        compare_memory(args)
    return results


if __name__ == "__main__":
    main()
