"""How one iteration's global batch is split over ranks and gradient-accumulation micro-steps.

The paper fixes the *global* batch (512 images per iteration in every stage); the hardware decides how it is
reached. :func:`plan_batch` takes the configured ``train.global_batch_size``, the world size and the per-stage
memory cap ``data.max_batch_size_per_rank`` and returns the per-rank micro-batch and the number of accumulation
steps, so that ``batch_size_per_rank * world_size * grad_accum_steps == global_batch`` on any world size that
divides the global batch. The loader and the trainer both read this one plan (``python -m pretrain.train --plan``
prints it), so the images a rank draws always match the step it trains.

What is computed per micro-batch under accumulation (as in DINOv3, which accumulates nothing but whose per-GPU
batch plays the same role): Sinkhorn-Knopp normalises the teacher logits of one micro-batch over all ranks
(``batch_size_per_rank * world_size`` images), and KoLeo spreads the class tokens of one rank's micro-batch.
Both depend on the micro-batch size, not on the global batch; everything else (DINO, iBOT, Gram) is a mean over
images and accumulates exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class BatchPlanError(ValueError):
    """The configured global batch cannot be reached on this world size (one-line reason)."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    batch_size_per_rank: int
    grad_accum_steps: int
    world_size: int
    max_batch_size_per_rank: int
    iterations: int

    @property
    def images_seen(self) -> int:
        return self.global_batch * self.iterations

    def to_dict(self) -> dict:
        return {**asdict(self), "images_seen": self.images_seen}


def plan_batch(global_batch: int, world_size: int, max_batch_size_per_rank: int, iterations: int = 0) -> BatchPlan:
    """Largest per-rank micro-batch ``<= max_batch_size_per_rank`` that divides ``global_batch / world_size``
    (hence the fewest accumulation steps). Raises :class:`BatchPlanError` when no split exists."""
    if global_batch < 1 or world_size < 1 or max_batch_size_per_rank < 1:
        raise BatchPlanError(
            f"train.global_batch_size={global_batch}, world size {world_size} and "
            f"data.max_batch_size_per_rank={max_batch_size_per_rank} must all be positive"
        )
    if global_batch % world_size:
        divisors = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        near = [max(w for w in divisors if w < world_size)] + [w for w in divisors if w > world_size][:1]
        raise BatchPlanError(
            f"train.global_batch_size={global_batch} cannot be split over {world_size} ranks: use a world size "
            f"that divides it (e.g. {' or '.join(map(str, near))}) or change train.global_batch_size"
        )
    per_rank_images = global_batch // world_size
    accum = next(d for d in range(1, per_rank_images + 1)
                 if per_rank_images % d == 0 and per_rank_images // d <= max_batch_size_per_rank)
    return BatchPlan(global_batch=global_batch, batch_size_per_rank=per_rank_images // accum, grad_accum_steps=accum,
                     world_size=world_size, max_batch_size_per_rank=max_batch_size_per_rank, iterations=iterations)


def plan_from_config(cfg, world_size: int) -> BatchPlan:
    """:func:`plan_batch` with ``train.global_batch_size``, ``data.max_batch_size_per_rank``, ``train.iterations``;
    refuses a one-image micro-batch when KoLeo is on (it needs a nearest neighbour within the micro-batch)."""
    plan = plan_batch(int(cfg.train.global_batch_size), int(world_size), int(cfg.data.max_batch_size_per_rank),
                      int(cfg.train.iterations))
    if plan.batch_size_per_rank < 2 and float(cfg.dino.koleo_loss_weight) > 0:
        raise BatchPlanError(
            f"the batch plan gives 1 image per rank and micro-step (global {plan.global_batch} over {world_size} "
            f"ranks, cap {plan.max_batch_size_per_rank}), but KoLeo needs at least 2 per micro-batch: raise "
            "data.max_batch_size_per_rank or train.global_batch_size, or use fewer ranks"
        )
    return plan
