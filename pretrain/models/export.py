"""Export a backbone from any supported checkpoint to safetensors (and optionally a HF directory).

    python -m pretrain.models.export --checkpoint out/teacher_backbone.pth --out backbone.safetensors \
        [--hf-dir backbone_hf] [--arch meddinov3_vitb16] [--prefer student] [--set norm_eps=1e-6 ...]

The safetensors file keeps the official DINOv3 key layout and stores the architecture in its metadata,
so ``load_backbone`` needs no options to read it back. ``--hf-dir`` also writes a transformers
``dinov3_vit`` directory (``config.json`` + ``model.safetensors`` with transformers key names and
q/k/v split) that ``transformers.AutoModel.from_pretrained`` and ``load_backbone`` both read, plus a
``preprocessor_config.json`` (``AutoImageProcessor``: the CT normalisation of clamped HU input) and a model
card (``README.md``: the CT -> ``pixel_values`` mapping, the architecture, where the weights come from).
The HU mapping is the pretraining one (``data.transform``): from the run's ``config.yaml`` next to the
checkpoint when there is one, else ``configs/pretrain/base.yaml`` (``--transform-config`` names another).
After writing, every output is reloaded and its features compared with the source model on a fixed input.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from meddino_common.atomic import atomic_write_json, atomic_write_text
from meddino_common.config import ConfigError
from pretrain.data.transforms import HUTransform
from meddino_common.config import shipped_config

from .checkpoint import load_backbone, read_backbone_checkpoint, save_backbone
from .checkpoint_files import BackboneCheckpoint, CheckpointError
from .hf_format import save_hf_dir
from .input_mapping import load_hu_transform, run_config_of
from .vision_transformer import ARCH_PRESETS, DinoVisionTransformer

SOURCE_DESCRIPTIONS = {
    "official": "the official DINOv3 release (Meta, natural images), converted without change",
    "meddinov3_release": "the MedDINOv3 release (DINOv3 ViT-B/16 pretrained on CT-3M by the MedDINOv3 authors): "
                         "its EMA teacher backbone, without the DINO/iBOT heads",
    "training": "a checkpoint of this project's DINOv3-recipe pretraining on CT (`python -m pretrain.train`)",
    "hf": "a transformers `dinov3_vit` folder",
    "export": "an export of this project (`python -m pretrain.models.export`)",
    "timm": "timm's DINOv3 weights (`vit_*_patch16_dinov3*`), converted back to the DINOv3 layout",
}


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


def transform_config_path(checkpoint: str | Path, transform_config: str | Path | None = None) -> Path:
    """The pretrain config whose ``data.transform`` the export documents (see the module docstring)."""
    if transform_config is not None:
        return Path(transform_config)
    run = run_config_of(checkpoint)
    return run if run is not None else shipped_config("pretrain", "base.yaml")


def preprocessor_config(transform: HUTransform) -> dict[str, Any] | None:
    """``preprocessor_config.json`` reproducing ``transform`` on clamped HU repeated to its channels.

    transformers' image processors normalise ``(x - mean) / std`` per channel but cannot clamp or repeat a
    grey channel, so the processor takes the slice already clamped to ``hu_clamp`` and repeated to
    ``n_channels`` (``[C, H, W]`` or ``[H, W, C]``); it neither resizes nor rescales. The ``window_set``
    mapping clamps each channel to its own window, which no processor option expresses: None then.
    """
    if transform.mode == "window_set":
        return None
    n = transform.n_channels
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": False,
        "do_center_crop": False,
        "do_rescale": False,
        "do_normalize": True,
        "do_convert_rgb": False,
        "image_mean": [transform.mean] * n,
        "image_std": [transform.std] * n,
    }


RUN_FACTS = ("stage", "student.arch", "train.iterations", "train.global_batch_size", "optim.lr", "init.backbone",
             "data.shards")  # what the model card repeats from a pretraining run's config.yaml


def _run_summary(checkpoint: str | Path) -> list[str]:
    """A few facts of the pretraining run that wrote ``checkpoint`` (its ``config.yaml``), when there is one."""
    run = run_config_of(checkpoint)
    if run is None:
        return []
    cfg = OmegaConf.load(run)
    return [f"`{k}`: {OmegaConf.select(cfg, k)}" for k in RUN_FACTS if OmegaConf.select(cfg, k) is not None]


def model_card(source: BackboneCheckpoint, model: DinoVisionTransformer, transform: HUTransform,
               transform_source: Path, rope_note: str | None) -> str:
    """The export's ``README.md``: how CT becomes ``pixel_values``, what the network is, where it comes from."""
    cfg = model.config
    lo, hi = transform.hu_clamp
    tokens = f"1 + {cfg.n_storage_tokens} + N"
    if transform.mode == "window_set":
        mapping = ("1. read the slice in HU;\n2. for each (level, width) window " + ", ".join(
            f"({lvl:g}, {w:g})" for lvl, w in transform.windows) + ": clamp to [level - width/2, level + width/2], "
            "scale to [0, 1];\n3. z-score channel c with mean " + f"{list(transform.window_mean)} and std "
            f"{list(transform.window_std)}.\n\nNo `preprocessor_config.json` is written: transformers' image "
            "processors cannot clamp per channel.")
        usage = ""
    else:
        mapping = (f"1. read the slice in HU (Hounsfield units), `[H, W]`, H and W multiples of {cfg.patch_size};\n"
                   f"2. clamp to [{lo:g}, {hi:g}] HU;\n"
                   f"3. repeat the one channel to {transform.n_channels};\n"
                   f"4. `pixel_values = (x - {transform.mean!r}) / {transform.std!r}` (every channel).\n\n"
                   "`preprocessor_config.json` performs step 4 (`AutoImageProcessor`); steps 2-3 are yours, "
                   "since transformers' image processors cannot clamp or repeat a grey channel.")
        usage = (
            "```python\nimport numpy as np\nfrom transformers import AutoImageProcessor, AutoModel\n\n"
            "processor = AutoImageProcessor.from_pretrained(folder)\nmodel = AutoModel.from_pretrained(folder)\n"
            f"x = np.repeat(np.clip(hu_slice, {lo:g}, {hi:g})[None], {transform.n_channels}, axis=0)  # [C, H, W]\n"
            f"tokens = model(**processor(x, return_tensors=\"pt\")).last_hidden_state  # [1, {tokens}, "
            f"{cfg.embed_dim}]\n```\n\n"
            "The same folder (or the safetensors export) loads into this project's backbone with "
            "`pretrain.models.load_backbone(folder)`.\n")
    run = _run_summary(source.path) if source.format == "training" else []
    made = SOURCE_DESCRIPTIONS.get(source.format, source.format)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-feature-extraction",
        "tags: [dinov3, medical-imaging, ct, vision-transformer]", "---", "",
        "# DINOv3 ViT backbone for CT", "",
        "A DINOv3 vision transformer (feature extractor, no task head) exported by MedDINOv3's "
        "`python -m pretrain.models.export`.", "",
        "## Input: CT -> `pixel_values`", "",
        f"The mapping used in pretraining (`data.transform`, mode `{transform.mode}`, from `{transform_source.name}`):",
        "", mapping, "", usage,
        "## Architecture", "",
        f"- ViT, patch {cfg.patch_size}, embed_dim {cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, "
        f"{cfg.in_chans} input channels",
        f"- FFN `{cfg.ffn_layer}` (ratio {cfg.ffn_ratio:g}), qkv bias {cfg.qkv_bias} (K bias masked: "
        f"{cfg.qkv_bias and cfg.mask_k_bias}), LayerScale {cfg.layerscale_init}, LayerNorm eps {cfg.norm_eps:g}",
        f"- 1 class token + {cfg.n_storage_tokens} register (storage) tokens; output tokens: {tokens} patches",
        f"- 2D RoPE, base period {cfg.pos_embed_rope_base:g}, coordinates `{cfg.pos_embed_rope_normalize_coords}`"
        f", computed in {cfg.pos_embed_rope_dtype}", "",
        "## How the weights were made", "",
        f"Source: `{source.path.name}`, {made}.",
    ]
    if source.ignored_prefixes:
        lines.append(f"Left out (not part of the backbone): {', '.join(source.ignored_prefixes)}.")
    if run:
        lines += ["", "Pretraining run (its `config.yaml`):", ""] + [f"- {r}" for r in run]
    if rope_note:
        lines += ["", "## Numerical note", "", rope_note]
    return "\n".join(lines).rstrip() + "\n"


def _rope_note(model: DinoVisionTransformer, hf_model: DinoVisionTransformer) -> str | None:
    """Say so when the HF folder computes RoPE in fp32 while the source computed it in bf16/fp16."""
    dtype = model.config.pos_embed_rope_dtype
    if dtype == "fp32":
        return None
    gen = torch.Generator().manual_seed(0)
    p = model.patch_size
    x = torch.randn(2, model.config.in_chans, 3 * p, 4 * p, generator=gen)
    with torch.no_grad():
        ref = model.forward_features(x)["x_prenorm"]
        rel = float((hf_model.forward_features(x)["x_prenorm"] - ref).norm() / ref.norm())
        tables = zip(model.rope_embed(H=14, W=14), hf_model.rope_embed(H=14, W=14))
        table_diff = max(float((a.float() - b.float()).abs().max()) for a, b in tables)
    return (f"The source computes its RoPE sin/cos in {dtype}; transformers' `dinov3_vit` computes them in fp32. "
            f"The tables differ by up to {table_diff:.2g} (14x14 patches), and this folder's features differ from "
            f"the source's by a relative error of {rel:.1e} (these weights, a random 3x4-patch input, measured at "
            "export; 3e-4 for a random ViT-B/16 with LayerScale 1 at 224 px). The safetensors export keeps the source's "
            "RoPE dtype exactly.")


def export_backbone(
    checkpoint: str | Path,
    out: str | Path,
    hf_dir: str | Path | None = None,
    arch: str | None = None,
    prefer: str = "teacher",
    transform_config: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Load ``checkpoint``, write ``out`` (and ``hf_dir``), verify by reloading; returns a report dict."""
    source = read_backbone_checkpoint(checkpoint, prefer=prefer)
    model = load_backbone(checkpoint, arch=arch, prefer=prefer, **overrides)
    report: dict[str, Any] = {"source_format": source.format, "ignored": source.ignored_prefixes, "rope_note": None}
    save_backbone(model, out)
    report["export_max_diff"] = _max_feature_diff(model, load_backbone(out))
    if hf_dir is not None:
        hf_dir = Path(hf_dir)
        transform_path = transform_config_path(checkpoint, transform_config)
        transform = load_hu_transform(transform_path)
        save_hf_dir(model, hf_dir)
        hf_model = load_backbone(hf_dir)
        report["hf_max_diff"] = _max_feature_diff(model, hf_model)
        report["rope_note"] = _rope_note(model, hf_model)
        processor = preprocessor_config(transform)
        if processor is not None:
            atomic_write_json(hf_dir / "preprocessor_config.json", processor)
        card = model_card(source, model, transform, transform_path, report["rope_note"])
        atomic_write_text(hf_dir / "README.md", card)
        report["transform_config"] = str(transform_path)
    report["config"] = model.config.to_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.models.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="any format load_backbone reads (official/MedDINOv3 .pth, training checkpoint, "
                             "HF or timm folder, .safetensors)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--hf-dir", help="also write a transformers dinov3_vit directory here (with "
                                         "preprocessor_config.json and a model card README.md)")
    parser.add_argument("--arch", choices=sorted(ARCH_PRESETS), help="assert a preset instead of inferring")
    parser.add_argument("--prefer", choices=["teacher", "student"], default="teacher",
                        help="which network of a training checkpoint holding both (default: teacher, the EMA)")
    parser.add_argument("--transform-config", default=None,
                        help="pretrain config whose data.transform the HF folder documents (default: the run's "
                             "config.yaml next to the checkpoint, else configs/pretrain/base.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                        metavar="KEY=VALUE", help="architecture override, e.g. norm_eps=1e-6 (repeatable)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        parser.error("--out must end with .safetensors")
    try:
        report = export_backbone(args.checkpoint, args.out, args.hf_dir, args.arch, args.prefer,
                                 args.transform_config, **dict(args.overrides))
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = report["config"]
    print(f"read     {args.checkpoint} ({report['source_format']} format"
          + (f"; ignored non-backbone entries {report['ignored']}" if report["ignored"] else "") + ")")
    print(f"backbone embed_dim={cfg['embed_dim']} depth={cfg['depth']} heads={cfg['num_heads']} "
          f"storage={cfg['n_storage_tokens']} qkv_bias={cfg['qkv_bias']} norm_eps={cfg['norm_eps']}")
    print(f"wrote    {args.out} (reloaded: max feature diff {report['export_max_diff']:.3g})")
    if args.hf_dir:
        print(f"wrote    {args.hf_dir}/ (transformers dinov3_vit; reloaded: max feature diff {report['hf_max_diff']:.3g}"
              f"; preprocessor and model card from {report['transform_config']})")
    if report["rope_note"]:
        print(f"note     {report['rope_note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
