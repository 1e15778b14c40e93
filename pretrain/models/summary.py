"""Model summary: parameter count and fvcore GFLOPs per image.

    python -m pretrain.models.summary --arch vitb16 --img 224
    python -m pretrain.models.summary --checkpoint teacher_backbone.pth --img 448 512

fvcore counts one FLOP per multiply-add (the convention of the DINO/ViT papers' "GFLOPs"). PyTorch's
fused ``scaled_dot_product_attention`` has no fvcore handler, so it is counted here as the two batched
matmuls it performs (``QK^T`` and ``AV``: ``2 * B * heads * N^2 * Dh`` multiply-adds).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer, build_backbone


@dataclass
class ModelSummary:
    parameters: int
    trainable_parameters: int
    gflops_per_image: float
    image_hw: tuple[int, int]
    n_tokens: int
    uncounted_ops: dict[str, int]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sdpa_flop_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q ``[B, H, N, Dh]``, k ``[B, H, M, Dh]``."""
    from fvcore.nn.jit_handles import get_shape

    q_shape, k_shape = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, n, dh = q_shape
    m = k_shape[-2]
    b = 1
    for d in batch:
        b *= d
    return 2 * b * n * m * dh


def summarize(model: DinoVisionTransformer, image_hw: tuple[int, int] = (224, 224)) -> ModelSummary:
    """Parameters and GFLOPs for one ``[1, in_chans, H, W]`` image (eval mode, no grad)."""
    from fvcore.nn import FlopCountAnalysis

    model = model.eval()
    x = torch.zeros(1, model.config.in_chans, *image_hw)
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        total = analysis.total()
        uncounted = dict(analysis.unsupported_ops())
    n_tokens = 1 + model.n_storage_tokens + (image_hw[0] // model.patch_size) * (image_hw[1] // model.patch_size)
    return ModelSummary(
        parameters=count_parameters(model),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        gflops_per_image=total / 1e9,
        image_hw=tuple(image_hw),
        n_tokens=n_tokens,
        uncounted_ops=uncounted,
    )


def format_summary(name: str, model: DinoVisionTransformer, s: ModelSummary) -> str:
    cfg = model.config
    lines = [
        f"backbone      {name}: embed_dim={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads} "
        f"patch={cfg.patch_size} storage_tokens={cfg.n_storage_tokens} ffn={cfg.ffn_layer}",
        f"parameters    {s.parameters:,} ({s.parameters / 1e6:.2f} M; trainable {s.trainable_parameters:,})",
        f"image         {s.image_hw[0]}x{s.image_hw[1]} -> {s.n_tokens} tokens",
        f"GFLOPs/image  {s.gflops_per_image:.2f} (fvcore, 1 FLOP = 1 multiply-add)",
    ]
    if s.uncounted_ops:
        lines.append(f"not counted   {', '.join(sorted(s.uncounted_ops))} (elementwise; fvcore ignores them)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.models.summary", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--arch", default="vitb16", choices=sorted(ARCH_PRESETS),
                     help="summarise a randomly initialised preset (default vitb16)")
    src.add_argument("--checkpoint", help="summarise a checkpoint (any format load_backbone reads)")
    parser.add_argument("--img", type=int, nargs="+", default=[224], help="image size: S (square) or H W")
    args = parser.parse_args(argv)
    if len(args.img) not in (1, 2):
        parser.error("--img takes one size (square) or two (H W)")
    image_hw = (args.img[0], args.img[-1])
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    if args.checkpoint:
        from .checkpoint import load_backbone

        model, name = load_backbone(args.checkpoint), args.checkpoint
    else:
        model, name = build_backbone(args.arch), args.arch
    print(format_summary(name, model, summarize(model, image_hw)))


if __name__ == "__main__":
    main()
