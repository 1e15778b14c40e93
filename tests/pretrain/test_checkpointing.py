"""Checkpoints: atomic writes, keep-last-K, RNG round trip, weights_only loading, kill -9 and resume bit-identical."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.train import checkpointing as ckpt_io
from pretrain.train.loop import train

LOSS_KEYS = ("dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "total_loss", "grad_norm")


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "ck" / "checkpoint_00000001.pth"

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_io.atomic_save({"x": Boom()}, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    ckpt_io.atomic_save({"x": torch.ones(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for it in (3, 6, 9, 12):
        ckpt_io.atomic_save({"i": it}, ckpt_io.checkpoint_path(tmp_path, it))
    (tmp_path / "notes.txt").write_text("kept")
    ckpt_io.prune_checkpoints(tmp_path, keep_last=2)
    assert [i for i, _ in ckpt_io.list_checkpoints(tmp_path)] == [9, 12]
    assert ckpt_io.latest_checkpoint(tmp_path).name == "checkpoint_00000012.pth"
    assert (tmp_path / "notes.txt").exists()


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = ckpt_io.atomic_save({"rng": ckpt_io.rng_state()}, tmp_path / "rng.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_resume_argument(tmp_path: Path) -> None:
    assert ckpt_io.find_resume_checkpoint(tmp_path, None) is None
    assert ckpt_io.find_resume_checkpoint(tmp_path, "auto") is None  # fresh start
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ckpt_io.find_resume_checkpoint(tmp_path, str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="not a pretrain.train checkpoint"):
        torch.save({"a": torch.ones(1)}, tmp_path / "other.pth")
        ckpt_io.load_checkpoint(tmp_path / "other.pth")


def test_reference_run_layout(tiny_reference_run: Path) -> None:
    out = tiny_reference_run
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    kept = [i for i, _ in ckpt_io.list_checkpoints(out / "checkpoints")]
    assert kept == [3, 6, 8]  # every 3 iterations + the end, the shipped keep_last=3
    state = ckpt_io.load_checkpoint(out / "checkpoints" / "checkpoint_00000008.pth")
    assert state["iteration"] == 8 and state["loader"]["batches_consumed"] == 8
    assert {"student", "teacher", "optimizer", "rng", "config"} <= state.keys()
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert exported.keys() == ckpt_io.teacher_backbone_state(state).keys()
    assert "blocks.0.attn.qkv.bias_mask" in exported and "rope_embed.periods" in exported
    for k, v in exported.items():
        assert torch.equal(v, state["teacher"]["backbone." + k]), k
    snapshot = torch.load(out / "teacher_snapshots" / "teacher_backbone_00000008.pth", weights_only=True)
    assert all(torch.equal(snapshot[k], exported[k]) for k in exported)
    from pretrain.models import load_backbone

    model = load_backbone(out / "teacher_backbone.pth", arch="vitb16", embed_dim=64, num_heads=4, depth=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tiny_reference_run: Path, ct3m_shards: Path, tmp_path: Path,
                                          make_tiny_cfg, metrics_of, reference_overrides, reference_cli,
                                          repo_root: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pretrain.train", *reference_cli(out, ct3m_shards)]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = out / "checkpoints" / "checkpoint_00000003.pth"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.communicate()
    assert first.exists(), "the first checkpoint never appeared"
    killed_at = ckpt_io.list_checkpoints(out / "checkpoints")[-1][0]
    assert killed_at < 8, "the run finished before it could be killed"

    result = train(make_tiny_cfg(ct3m_shards, out, *reference_overrides), resume="auto")
    assert result.finished and result.iteration == 8
    ref, got = metrics_of(tiny_reference_run), metrics_of(out)
    assert [r["iteration"] for r in got] == list(range(8))
    for a, b in zip(ref, got):
        for k in LOSS_KEYS:
            assert a[k] == b[k], (a["iteration"], k, a[k], b[k])
    t_ref = torch.load(tiny_reference_run / "teacher_backbone.pth", weights_only=True)
    t_got = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(t_ref[k], t_got[k]) for k in t_ref)
