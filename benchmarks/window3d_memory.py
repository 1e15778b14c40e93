"""Peak memory of the window3d two-pass scheme (pass 2) vs. one backward through all sub-cubes, on CPU.

    python benchmarks/window3d_memory.py [--crop 32 64 64] [--cubes 2 2 2] [--embed-dim 64] [--depth 4]

Both runs compute the same loss and the same parameter gradients (checked here too); the question is how much
memory the backward needs. Two figures, measured in the same process on a real CT crop (MSD spleen, from
``../shared/data/real``; a random volume if it is missing, said so in the output):

- torch profiler: the peak of live CPU allocations (``profile_memory=True``; allocation/free events summed in
  time order) during pass 2 vs. during the single-graph forward + backward;
- saved activations: the peak bytes of tensors autograd keeps for backward (``saved_tensors_hooks``).

Pass 2 holds one cube's graph at a time, so its peak should be about the single graph's divided by the number
of cubes. Printed as ratios (single graph / pass 2).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from finetune.heads.window3d import (
    Window3DConfig, Window3DModel, cube_slices, single_graph_backward, two_pass_first, two_pass_second,
)
from finetune.losses import dice_ce_loss
from pretrain.models import build_backbone


def real_crop(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A crop of the real MSD spleen case (edge-padded in depth to ``shape``), z-scored; else random data."""
    root = Path(os.environ.get("MEDDINO_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    folder = root / "real" / "ivadomed_msd_spleen"
    d, h, w = shape
    if not folder.exists():
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, 1, d, h, w, generator=g), (torch.rand(1, d, h, w, generator=g) > 0.8).long(), "random"
    import nibabel as nib

    ct = nib.load(str(folder / "sub-spleen2_ct.nii.gz")).get_fdata().transpose(2, 1, 0)
    seg = nib.load(str(folder / "sub-spleen2_ct_seg-manual.nii.gz")).get_fdata().transpose(2, 1, 0)
    _, y, x = np.argwhere(seg > 0).mean(0).astype(int)
    y0, x0 = max(0, y - h // 2), max(0, x - w // 2)
    ct, seg = ct[:, y0:y0 + h, x0:x0 + w], seg[:, y0:y0 + h, x0:x0 + w]
    reps = -(-d // ct.shape[0])
    ct, seg = np.concatenate([ct] * reps)[:d], np.concatenate([seg] * reps)[:d]
    ct = np.clip(ct, -160, 240)
    ct = (ct - ct.mean()) / ct.std()
    return (torch.from_numpy(ct.astype(np.float32))[None, None], torch.from_numpy((seg > 0).astype(np.int64))[None],
            "MSD spleen (real CT)")


def profiler_peak_bytes(fn) -> int:
    """Peak of live CPU allocations made while ``fn`` runs (torch profiler, op granularity)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are attributed to the op that made them (self memory, children excluded), frees that happen
    # outside an op appear as "[memory]" events; summing both in start-time order gives the live-bytes curve
    events = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage]
    live = peak = 0
    for _, delta in sorted(events, key=lambda t: t[0]):
        live += delta
        peak = max(peak, live)
    return peak


def saved_activation_peak_bytes(fn) -> int:
    """Peak bytes of tensors saved for backward that are still alive (released when their graph is freed)."""
    state = {"live": 0, "peak": 0}

    class Tracked:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, self.n = t, t.numel() * t.element_size()
            state["live"] += self.n
            state["peak"] = max(state["peak"], state["live"])

        def __del__(self) -> None:
            state["live"] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(lambda t: Tracked(t), lambda p: p.t):
        fn()
    return state["peak"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--cubes", type=int, nargs=3, default=(2, 2, 2))
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--fusion-channels", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbone = build_backbone("vitt16", embed_dim=args.embed_dim, depth=args.depth, num_heads=4)
    e = args.embed_dim
    cfg = Window3DConfig(design_depth=args.crop[0], proj_channels=[e // 2, e // 2, e, e],
                         fusion_channels=args.fusion_channels)
    model = Window3DModel(backbone, 2, cfg)
    volume, label, source = real_crop(tuple(args.crop))
    loss_fn = dice_ce_loss
    n_cubes = int(np.prod(args.cubes))

    def single() -> None:
        model.zero_grad(set_to_none=True)
        single_graph_backward(model, volume, label, loss_fn, args.cubes)

    first = two_pass_first(model, volume, label, loss_fn, args.cubes)

    def pass2() -> None:
        model.zero_grad(set_to_none=True)
        two_pass_second(model, volume, first)

    # same gradients (sanity), and a warm-up of both paths before measuring
    single()
    ref = [p.grad.clone() for p in model.trainable_parameters()]
    pass2()
    err = max(float((a - p.grad).abs().max() / (a.abs().max() + 1e-12)) for a, p in zip(ref, model.trainable_parameters()))

    first_cube = cube_slices(volume.shape[-3:], args.cubes)[0]

    def one_cube() -> None:  # the bound: one cube's forward + backward on its own
        model.zero_grad(set_to_none=True)
        model(volume[(Ellipsis, *first_cube)]).backward(first.grad_logits[(Ellipsis, *first_cube)])

    prof_single, prof_pass2, prof_cube = (profiler_peak_bytes(f) for f in (single, pass2, one_cube))
    saved_single, saved_pass2, saved_cube = (saved_activation_peak_bytes(f) for f in (single, pass2, one_cube))
    mib = 2 ** 20
    print(f"window3d memory: crop {tuple(args.crop)} from {source}, {n_cubes} sub-cubes {tuple(args.cubes)}, "
          f"backbone embed {e} depth {args.depth}, decoder width {args.fusion_channels}")
    print(f"gradient agreement two-pass vs single graph: max relative diff {err:.2e}")
    print(f"{'':32}{'single graph':>14}{'pass 2':>11}{'one cube':>11}{'single/pass2':>14}{'pass2/cube':>12}")
    for name, full, p2, cube in (("profiler peak live CPU memory", prof_single, prof_pass2, prof_cube),
                                 ("peak saved activations", saved_single, saved_pass2, saved_cube)):
        print(f"{name:32}{full / mib:10.1f} MiB{p2 / mib:7.1f} MiB{cube / mib:7.1f} MiB"
              f"{full / max(p2, 1):13.2f}x{p2 / max(cube, 1):11.2f}x")
    print(f"(single/pass2 ideally >= number of cubes = {n_cubes}: the single graph also holds the global loss; "
          "pass2/cube ~ 1: pass 2 is bounded by one cube)")


if __name__ == "__main__":
    main()
