"""FLOPs of one SSL iteration (fvcore) and the MFU they imply, without touching the training modules.

The count runs on a separate, freshly built copy of the student backbone's architecture (same ``ViTConfig``,
drop path off, eval mode, on the training device): tracing the training backbone itself would need eval mode,
and a counter that switches the student to eval and forgets to switch it back trains a whole run without drop
path, RoPE jitter and activation checkpointing. Weights do not change FLOPs, so the copy is never loaded; under
FSDP it also avoids all-gathers during the trace. Counts are cached per crop-size combination, so stage 3's mixed
resolutions are each counted once, when first seen.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

# bf16 dense peak per GPU, TFLOP/s (vendor figures); compute.peak_tflops overrides
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _sdpa_flop_handle(inputs, outputs):  # fvcore op handle: 2 matmuls of [B,H,N,d] x [B,H,d,N]
    from fvcore.nn.jit_handles import get_shape  # noqa: PLC0415

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    b_h = int(np.prod(q[:-2]))
    return 2 * b_h * q[-2] * k[-2] * q[-1]  # fvcore counts one multiply-add as one flop


class _PatchTokens(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)["x_norm_patchtokens"]


class FlopCounter:
    """``per_micro_batch(batch)``: approximate FLOPs (2 x multiply-adds) of one micro-batch — student forward and
    backward (3 x forward) on all crops, teacher forward on the global crops, Gram teacher forward on its crops —
    or None when fvcore is missing or cannot trace the model (logged once)."""

    def __init__(self, backbone: nn.Module, n_global: int, use_gram: bool, device: torch.device) -> None:
        self.config = backbone.config
        self.n_global, self.use_gram, self.device = n_global, use_gram, device
        self._per_image: dict[int, float] = {}
        self._model: nn.Module | None = None
        self.failed = False

    def _image_flops(self, side: int) -> float:
        if side not in self._per_image:
            from fvcore.nn import FlopCountAnalysis  # noqa: PLC0415
            from pretrain.models.vision_transformer import DinoVisionTransformer  # noqa: PLC0415

            if self._model is None:
                kwargs = {**self.config.to_dict(), "drop_path_rate": 0.0}
                # random init must not advance the training RNG streams (a resumed run would diverge)
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    self._model = _PatchTokens(DinoVisionTransformer(**kwargs)).to(self.device).eval()
            x = torch.zeros(1, self.config.in_chans, side, side, device=self.device)
            analysis = FlopCountAnalysis(self._model, (x,))
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            self._per_image[side] = 2.0 * float(analysis.total())
        return self._per_image[side]

    def per_micro_batch(self, batch: dict) -> float | None:
        if self.failed:
            return None
        g = batch["collated_global_crops"]
        B = g.shape[0] // self.n_global
        local = batch.get("collated_local_crops")
        n_local = 0 if local is None or local.numel() == 0 else local.shape[0] // B
        gram = batch.get("collated_gram_teacher_crops") if self.use_gram else None
        try:
            with torch.no_grad():
                f_global = self._image_flops(int(g.shape[-1]))
                f_local = self._image_flops(int(local.shape[-1])) if n_local else 0.0
                f_gram = self._image_flops(int(gram.shape[-1])) if gram is not None else 0.0
        except Exception as err:  # noqa: BLE001 - FLOP counting is best effort, never fatal
            print(f"[pretrain] FLOP counting skipped: {str(err).splitlines()[0] if str(err) else err!r}", flush=True)
            self.failed = True
            return None
        per_image = 3 * (self.n_global * f_global + n_local * f_local) + self.n_global * (f_global + f_gram)
        return per_image * B


def peak_flops(peak_tflops: float | None, device: torch.device) -> float | None:
    """Per-device peak FLOP/s for the MFU: ``compute.peak_tflops`` or the vendor figure for the GPU's name."""
    if device.type != "cuda":
        return None
    if peak_tflops is None:
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)
    return None if peak_tflops is None else float(peak_tflops) * 1e12
