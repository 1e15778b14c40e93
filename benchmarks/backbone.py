"""Backbone speed: our DINOv3 ViT-B/16 against timm's ``vit_base_patch16_dinov3``, same weights and input.

What is measured: one forward + backward pass (loss = mean of squared normed output tokens; ours reads
them from the ``forward_features`` dict as a training loss would) at batch 8, fp32, on CPU, for 224 and
448 px images; the timm model gets our weights through timm's own DINOv3 checkpoint converter. Both run
in eval mode (no drop path, no RoPE augmentation) so their outputs can be checked equal (outputs and the
patch-embedding / cls / storage-token gradients, which depend on every block); the kernels are the same
as in training. Runs of the two models are interleaved so that load from other processes hits both
alike; printed: the ratio of median wall times (target: ours <= 1.0x), the median of per-round ratios,
the ratio of process CPU times (less sensitive to other processes), and the load average.
``--profile`` adds a per-op self-CPU-time table of both models side by side (where time goes).

timm needs torchvision, and PyPI's torchvision does not import next to the project's torch 2.13 wheel,
so this runs in a separate throwaway venv (never the project's ``.venv``):

    python3.11 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
    /tmp/benchvenv/bin/pip install --no-deps -e .   # this project, editable, without its pinned torch
    /tmp/benchvenv/bin/python benchmarks/backbone.py [--sizes 224 448] [--batch 8] [--rounds 3] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from pretrain.models import build_backbone


def make_models(seed: int = 0):
    """Our ViT-B/16 (timm's variant has no qkv bias) and timm's, sharing the same random weights.

    LayerScale gammas are set to ~1 (instead of the 1e-5 init) so every block changes the output and the
    equality check is meaningful.
    """
    import timm
    from timm.models.eva import checkpoint_filter_fn

    torch.manual_seed(seed)
    ours = build_backbone("vitb16", qkv_bias=False)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.normal_(1.0, 0.1)
    theirs = timm.create_model("vit_base_patch16_dinov3", pretrained=False)
    theirs.load_state_dict(checkpoint_filter_fn(ours.state_dict(), theirs), strict=True)
    return ours.eval(), theirs.eval()


def ours_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """Normed ``[B, 1+S+N, D]`` tokens (cls, storage, patches), the layout of timm's ``forward_features``."""
    ff = model.forward_features(x)
    return torch.cat([ff["x_norm_clstoken"].unsqueeze(1), ff["x_storage_tokens"], ff["x_norm_patchtokens"]], 1)


def ours_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Mean of squared normed tokens, from the output dict as a training loss would use it (no re-concat)."""
    ff = model.forward_features(x)
    parts = (ff["x_norm_clstoken"], ff["x_storage_tokens"], ff["x_norm_patchtokens"])
    return sum(p.square().sum() for p in parts) / sum(p.numel() for p in parts)


def timm_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x).square().mean()


def step(loss_fn, model, x: torch.Tensor) -> tuple[float, float]:
    """One forward + backward; returns (wall seconds, CPU seconds of this process, all threads)."""
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    loss_fn(model, x).backward()
    return time.perf_counter() - t0, time.process_time() - c0


def check_equal(ours, theirs, x: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of outputs (no grad) and of the patch-embedding, cls and storage-token gradients."""
    with torch.no_grad():
        out_diff = float((ours_tokens(ours, x) - theirs.forward_features(x)).abs().max())
    step(ours_loss, ours, x)
    step(timm_loss, theirs, x)
    pairs = [  # (ours, timm) parameters whose gradients depend on every block
        (ours.patch_embed.proj.weight, theirs.patch_embed.proj.weight),
        (ours.cls_token, theirs.cls_token),
        (ours.storage_tokens, theirs.reg_token),
    ]
    grad_diff = max(float((a.grad - b.grad).abs().max()) for a, b in pairs)
    return out_diff, grad_diff


def profile_table(ours, theirs, x: torch.Tensor, top: int = 30) -> str:
    """Per-op self CPU time of one fwd+bwd of each model (torch.profiler), side by side, largest first."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, fn, model in (("ours", ours_loss, ours), ("timm", timm_loss, theirs)):
        step(fn, model, x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(fn, model, x)
        tables[name] = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
    keys = sorted(set(tables["ours"]) | set(tables["timm"]),
                  key=lambda k: -max(tables["ours"].get(k, (0, 0))[0], tables["timm"].get(k, (0, 0))[0]))
    lines = [f"{'op (self CPU)':58s} {'ours s':>8s} {'calls':>6s} {'timm s':>8s} {'calls':>6s} {'ours-timm':>9s}"]
    for k in keys[:top]:
        (o, no), (t, nt) = tables["ours"].get(k, (0.0, 0)), tables["timm"].get(k, (0.0, 0))
        lines.append(f"{k[:58]:58s} {o:8.3f} {no:6d} {t:8.3f} {nt:6d} {o - t:+9.3f}")
    to, tt = (sum(v[0] for v in tables[n].values()) for n in ("ours", "timm"))
    lines.append(f"{'total':58s} {to:8.3f} {'':6s} {tt:8.3f} {'':6s} {to - tt:+9.3f}")
    return "\n".join(lines)


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per model and size (after 1 warm-up)")
    parser.add_argument("--profile", action="store_true", help="also print a per-op profile table per size")
    args = parser.parse_args(argv)

    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, fp32, CPU; {load()}")
    ours, theirs = make_models()
    failed = False
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        out_diff, grad_diff = check_equal(ours, theirs, x[:2])
        same = out_diff <= 1e-4 and grad_diff <= 1e-3
        failed |= not same
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "timm": []}
        pair = [("ours", ours_loss, ours), ("timm", timm_loss, theirs)]
        for r in range(args.rounds + 1):
            for name, fn, model in pair if r % 2 == 0 else pair[::-1]:
                elapsed = step(fn, model, x)
                if r > 0:  # round 0 is the warm-up
                    runs[name].append(elapsed)
        wall = {n: statistics.median(w for w, _ in v) for n, v in runs.items()}
        cpu = {n: statistics.median(c for _, c in v) for n, v in runs.items()}
        paired = statistics.median(o[0] / t[0] for o, t in zip(runs["ours"], runs["timm"]))
        print(
            f"{size}px batch {args.batch}: ours {wall['ours']:.2f}s  timm {wall['timm']:.2f}s  (median of "
            f"{args.rounds} interleaved fwd+bwd; all ours {[round(w, 2) for w, _ in runs['ours']]}, timm "
            f"{[round(w, 2) for w, _ in runs['timm']]})\n"
            f"  ratio ours/timm = {wall['ours'] / wall['timm']:.3f}x wall (median of per-round ratios "
            f"{paired:.3f}x; process CPU time {cpu['ours'] / cpu['timm']:.3f}x)  {load()}\n"
            f"  outputs max|diff| {out_diff:.2e}, grad max|diff| {grad_diff:.2e} {'OK' if same else 'MISMATCH'}",
            flush=True,
        )
        if args.profile:
            print(profile_table(ours, theirs, x), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
