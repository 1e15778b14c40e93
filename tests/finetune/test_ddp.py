"""Multi-process finetuning through torchrun (DDP, gloo on CPU), the launcher the README gives for multi-GPU."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


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
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paper_mean"]["dice"] == summary["paper_mean"]["dice"]  # evaluated (rank 0 only) and finite
    state = torch.load(out / "model_final.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the DDP wrapper is not saved
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["train_loss"] == m["train_loss"] for m in metrics)
