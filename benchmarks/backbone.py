"""Backbone speed: our DINOv3 ViT-B/16 against timm's ``vit_base_patch16_dinov3``, same weights and input.

What is measured: one forward + backward pass (loss = mean of squared normed output tokens) at batch 8,
fp32, on CPU, for 224 and 448 px images; the timm model gets our weights through timm's own DINOv3
checkpoint converter. Both run in eval mode (no drop path, no RoPE augmentation) so their outputs can
be checked equal; the kernels are the same as in training. Runs of the two models are interleaved so
that load from other processes hits both alike; the ratio of medians is printed (target: ours <= 1.0x).

timm needs torchvision, and PyPI's torchvision does not import next to the project's torch 2.13 wheel,
so this runs in a separate throwaway venv (never the project's ``.venv``):

    python3.11 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm safetensors numpy
    /tmp/benchvenv/bin/python benchmarks/backbone.py [--sizes 224 448] [--batch 8] [--rounds 3]

The script puts the repository root on ``sys.path`` itself, so no install of this project is needed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.models import build_backbone  # noqa: E402


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


def step(fn, model, x: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = fn(model, x).square().mean()
    loss.backward()
    return time.perf_counter() - t0


def check_equal(ours, theirs, x: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of outputs (no grad) and of the patch-embedding weight gradients."""
    with torch.no_grad():
        out_diff = float((ours_tokens(ours, x) - theirs.forward_features(x)).abs().max())
    step(ours_tokens, ours, x)
    step(lambda m, t: m.forward_features(t), theirs, x)
    grad_diff = float((ours.patch_embed.proj.weight.grad - theirs.patch_embed.proj.weight.grad).abs().max())
    return out_diff, grad_diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per model and size (after 1 warm-up)")
    args = parser.parse_args(argv)

    import timm

    print(f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, fp32, CPU")
    ours, theirs = make_models()
    failed = False
    for size in args.sizes:
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(size))
        out_diff, grad_diff = check_equal(ours, theirs, x[:2])
        same = out_diff <= 1e-4 and grad_diff <= 1e-3
        failed |= not same
        t_ours, t_timm = [], []
        for r in range(args.rounds + 1):
            pair = [(ours_tokens, ours, t_ours), (lambda m, t: m.forward_features(t), theirs, t_timm)]
            for fn, model, times in pair if r % 2 == 0 else pair[::-1]:
                elapsed = step(fn, model, x)
                if r > 0:  # round 0 is the warm-up
                    times.append(elapsed)
        mo, mt = statistics.median(t_ours), statistics.median(t_timm)
        print(
            f"{size}px batch {args.batch}: ours {mo:.2f}s  timm {mt:.2f}s  (median of {args.rounds} fwd+bwd; "
            f"min {min(t_ours):.2f}s / {min(t_timm):.2f}s)  ratio ours/timm = {mo / mt:.3f}x  "
            f"| outputs max|diff| {out_diff:.2e}, grad max|diff| {grad_diff:.2e} {'OK' if same else 'MISMATCH'}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
