"""Export a backbone from any supported checkpoint to safetensors (and optionally a HF directory).

    python -m pretrain.models.export --checkpoint out/teacher_backbone.pth --out backbone.safetensors \
        [--hf-dir backbone_hf] [--arch meddinov3_vitb16] [--prefer student] [--set norm_eps=1e-6 ...]

The safetensors file keeps the official DINOv3 key layout and stores the architecture in its metadata,
so ``load_backbone`` needs no options to read it back. ``--hf-dir`` also writes a transformers
``dinov3_vit`` directory (``config.json`` + ``model.safetensors`` with transformers key names and
q/k/v split) that ``transformers.AutoModel.from_pretrained`` and ``load_backbone`` both read. After
writing, every output is reloaded and its features compared with the source model on a fixed input.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, load_backbone, read_backbone_checkpoint, save_backbone, save_hf_dir
from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def _max_feature_diff(a: DinoVisionTransformer, b: DinoVisionTransformer) -> float:
    """Largest abs difference of eval-mode pre-norm tokens on a fixed non-square input."""
    gen = torch.Generator().manual_seed(0)
    p = a.patch_size
    x = torch.randn(2, a.config.in_chans, 3 * p, 4 * p, generator=gen)
    with torch.no_grad():
        return float((a.forward_features(x)["x_prenorm"] - b.forward_features(x)["x_prenorm"]).abs().max())


def export_backbone(
    checkpoint: str | Path,
    out: str | Path,
    hf_dir: str | Path | None = None,
    arch: str | None = None,
    prefer: str = "teacher",
    **overrides: Any,
) -> dict[str, Any]:
    """Load ``checkpoint``, write ``out`` (and ``hf_dir``), verify by reloading; returns a report dict."""
    source = read_backbone_checkpoint(checkpoint, prefer=prefer)
    model = load_backbone(checkpoint, arch=arch, prefer=prefer, **overrides)
    report: dict[str, Any] = {"source_format": source.format, "ignored": source.ignored_prefixes}
    save_backbone(model, out)
    report["export_max_diff"] = _max_feature_diff(model, load_backbone(out))
    if hf_dir is not None:
        save_hf_dir(model, hf_dir)
        report["hf_max_diff"] = _max_feature_diff(model, load_backbone(hf_dir))
    report["config"] = model.config.to_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="any format load_backbone reads")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--hf-dir", help="also write a transformers dinov3_vit directory here")
    parser.add_argument("--arch", choices=sorted(ARCH_PRESETS), help="assert a preset instead of inferring")
    parser.add_argument("--prefer", choices=["teacher", "student"], default="teacher")
    parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                        metavar="KEY=VALUE", help="architecture override, e.g. norm_eps=1e-6 (repeatable)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error("--out must end with .safetensors")
    try:
        report = export_backbone(args.checkpoint, args.out, args.hf_dir, args.arch, args.prefer, **dict(args.overrides))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = report["config"]
    print(f"read     {args.checkpoint} ({report['source_format']} format"
          + (f"; ignored non-backbone entries {report['ignored']}" if report["ignored"] else "") + ")")
    print(f"backbone embed_dim={cfg['embed_dim']} depth={cfg['depth']} heads={cfg['num_heads']} "
          f"storage={cfg['n_storage_tokens']} qkv_bias={cfg['qkv_bias']} norm_eps={cfg['norm_eps']}")
    print(f"wrote    {args.out} (reloaded: max feature diff {report['export_max_diff']:.3g})")
    if args.hf_dir:
        print(f"wrote    {args.hf_dir}/ (transformers dinov3_vit; reloaded: max feature diff {report['hf_max_diff']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
