"""KoLeo regulariser: spreads L2-normalised features by maximising the log distance to the nearest neighbour."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-8  # as in the Kozachenko-Leonenko estimator of DINOv2/v3: guards normalisation and log(0)


def koleo_loss(x: Tensor) -> Tensor:
    """-mean_i log ||x_i - x_nn(i)|| over the rows of ``x`` after L2 normalisation.

    Args:
        x: [B, D] features (e.g. pre-head class tokens of one global crop over the per-rank batch), B >= 2.

    Returns:
        Scalar. The nearest neighbour of each row is the other row of largest cosine similarity; distances use
        ``F.pairwise_distance`` (p=2, eps=1e-8), then ``-log(d + 1e-8)`` is averaged, in fp32.
    """
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows to find nearest neighbours, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=_EPS)
        similarity = x @ x.t()  # [B, B]
        similarity.fill_diagonal_(-2.0)  # below any cosine similarity: a row is never its own neighbour
        neighbour = similarity.argmax(dim=1)  # [B]
        distance = F.pairwise_distance(x, x[neighbour], p=2, eps=_EPS)  # [B]
        return -torch.log(distance + _EPS).mean()
