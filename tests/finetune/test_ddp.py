"""Multi-process finetuning through torchrun (DDP, gloo on CPU), the launcher the README gives for multi-GPU."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finetune.data import rank_batch_plan
from finetune.losses import dice_ce_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluate(tiny_nnunet_dataset: Path, repo_root: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "finetune/run.py", "--task", str(tiny_nnunet_dataset), "--config", "configs/finetune/tiny.yaml",
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout
    # tiny.yaml: global batch 2 -> one sample per rank; oversample 0.33 forces the global batch's last sample
    assert "batch plan: global batch 2 over 2 process(es)" in proc.stdout
    assert "rank 0: 1 samples, oversample 0.000 (0 forced foreground)" in proc.stdout
    assert "rank 1: 1 samples, oversample 1.000 (1 forced foreground)" in proc.stdout
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert summary["paper_mean"]["dice"] == summary["paper_mean"]["dice"]  # evaluated (rank 0 only) and finite
    state = torch.load(out / "model_final.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the DDP wrapper is not saved
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)


def _nnunet_split(global_batch: int, world: int, oversample: float) -> list[tuple[int, float]]:
    """nnU-Net's ``_set_batch_size_and_oversample`` for every rank, written out from its code as read."""
    sizes = [global_batch // world] * world
    sizes = [sizes[i] + 1 if sizes[i] * world + i < global_batch else sizes[i] for i in range(world)]
    forced = [not i < round(global_batch * (1 - oversample)) for i in range(global_batch)]
    out = []
    for rank in range(world):
        low, high = sum(sizes[:rank]), sum(sizes[:rank + 1])
        if high / global_batch < 1 - oversample:
            frac = 0.0
        elif low / global_batch > 1 - oversample:
            frac = 1.0
        else:
            frac = sum(forced[low:high]) / sizes[rank]
        out.append((sizes[rank], frac))
    return out


@pytest.mark.parametrize("global_batch,world,oversample", [(12, 4, 0.33), (12, 1, 0.33), (13, 4, 0.33), (2, 2, 0.33),
                                                           (24, 8, 0.5), (7, 3, 1.0), (5, 5, 0.0)])
def test_rank_batch_plan_is_nnunet_split(global_batch, world, oversample):
    plan = rank_batch_plan(global_batch, world, oversample)
    assert [(r.batch_size, r.oversample) for r in plan] == _nnunet_split(global_batch, world, oversample)
    # the step still forces as many foreground samples as one process with the whole batch would
    assert sum(r.n_forced for r in plan) == global_batch - round(global_batch * (1 - oversample))
    assert [r.n_forced for r in rank_batch_plan(12, 4, 0.33)] == [0, 0, 1, 3]


def test_batch_smaller_than_world_is_a_clear_error():
    with pytest.raises(ValueError, match="global batch"):
        rank_batch_plan(2, 4, 0.33)


def _gathered_dice_worker(rank: int, world: int, init_file: str, logits: torch.Tensor, target: torch.Tensor,
                          out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        share = logits.shape[0] // world
        local = logits[rank * share:(rank + 1) * share].clone().requires_grad_(True)
        loss = dice_ce_loss(local, target[rank * share:(rank + 1) * share], ddp=True)
        loss.backward()
        out[rank] = (float(loss), local.grad.clone())
    finally:
        dist.destroy_process_group()


def test_ddp_batch_dice_is_the_global_batch_dice(tmp_path):
    """Two gloo processes, each with half the batch: the loss's Dice term is the whole batch's, and (after DDP's
    averaging over ranks) each rank's gradient is the single-process gradient of its samples."""
    torch.manual_seed(0)
    logits, target = torch.randn(4, 3, 12, 12), torch.randint(0, 3, (4, 12, 12))
    target[2:] = 0                                              # rank 1 sees only background: its local Dice would differ
    full = logits.clone().requires_grad_(True)
    dice_ce_loss(full, target).backward()
    out = mp.Manager().dict()
    mp.spawn(_gathered_dice_worker, args=(2, str(tmp_path / "init"), logits, target, out), nprocs=2, join=True)
    for rank in range(2):
        _, grad = out[rank]
        torch.testing.assert_close(grad / 2, full.grad[rank * 2:(rank + 1) * 2], atol=1e-6, rtol=1e-5)
    # the Dice term is global: the two ranks' losses differ only by their local cross-entropy
    ce = [float(torch.nn.functional.cross_entropy(logits[r * 2:(r + 1) * 2], target[r * 2:(r + 1) * 2])) for r in range(2)]
    assert out[0][0] - ce[0] == pytest.approx(out[1][0] - ce[1], abs=1e-6)
