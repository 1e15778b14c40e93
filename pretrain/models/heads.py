"""Projection heads of the DINO / iBOT objectives.

Same semantics as the official DINOv3 ``DINOHead``: an MLP ``D -> hidden -> hidden -> bottleneck`` (GELU between
layers, biases on), L2 normalisation of the bottleneck vector, then a bias-free linear layer to the ``K`` prototypes.
Unlike DINO/DINOv2 there is no weight normalisation on the last layer. The same class serves the DINO head (on
class tokens) and the iBOT head (on masked patch tokens); the meta-architecture builds two separate instances.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _make_mlp(n_layers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int) -> nn.Module:
    """``n_layers`` linear layers with GELU in between; a single layer maps straight to the bottleneck."""
    if n_layers < 1:
        raise ValueError(f"DINO head needs at least one MLP layer, got n_layers={n_layers}")
    if n_layers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(n_layers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> bias-free prototypes layer.

    ``forward(x[N, D]) -> logits[N, K]``. ``last_layer`` is the prototype matrix ``[K, bottleneck]``; the trainer
    freezes it during the first epoch (its parameter names start with ``last_layer``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.mlp = _make_mlp(n_layers, in_dim, hidden_dim, bottleneck_dim)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) weights for every linear layer, prototypes included, and zero biases: the
        official DINOv3 head applies that init to all of its ``nn.Linear`` modules."""
        for module in [*self.mlp.modules(), self.last_layer]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, D]`` -> prototype logits ``[N, K]`` (cosine-like scores: unit bottleneck times prototypes)."""
        z = self.mlp(x)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        z = F.normalize(z, dim=-1, p=2, eps=eps)
        return self.last_layer(z)
