"""End to end on real-CT shards: tiny stage 1 (finite losses, total decreases), preemption (SIGUSR1 -> checkpoint,
exit, identical resume), NaN stop keeping the last good checkpoint, stages 2 and 3 chained by pretrain.pipeline,
and stage 3 really mixing resolutions."""
from __future__ import annotations

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.train import checkpointing as ckpt_io
from pretrain.train.loop import NonFiniteLossError, train

STAGE1_TERMS = ("dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "total_loss")


def test_tiny_stage1_losses_finite_and_total_decreases(tiny_reference_run: Path, metrics_of) -> None:
    records = metrics_of(tiny_reference_run)
    assert len(records) == 8
    for r in records:
        for k in (*STAGE1_TERMS, "lr", "wd", "mom", "teacher_temp", "grad_norm", "it_per_s"):
            assert math.isfinite(r[k]), (r["iteration"], k)
    first = sum(r["total_loss"] for r in records[:2]) / 2
    last = sum(r["total_loss"] for r in records[-2:]) / 2
    assert last < first - 0.1, (first, last)
    # the schedules reach the loop: teacher temperature warms up from 0.04 (towards 0.07), momentum rises
    temps = [r["teacher_temp"] for r in records]
    assert temps[0] == pytest.approx(0.04) and temps == sorted(temps) and 0.04 < temps[-1] <= 0.07
    assert records[-1]["mom"] > records[0]["mom"]
    assert records[0]["last_layer_lr"] == 0.0 and records[-1]["last_layer_lr"] > 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    ct3m_shards: Path, tmp_path: Path, make_tiny_cfg
) -> None:
    from pretrain.data import build_ssl_loader

    cfg = make_tiny_cfg(ct3m_shards, tmp_path, "train.iterations=4", "checkpointing.period=1")

    def poisoned():
        for i, batch in enumerate(build_ssl_loader(cfg, 0, 1, 0)):
            if i == 2:
                batch["collated_global_crops"] = batch["collated_global_crops"] * float("nan")
            yield batch

    with pytest.raises(NonFiniteLossError, match=r"iteration 2.*checkpoint_00000002\.pth"):
        train(cfg, batches=poisoned())
    assert [i for i, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    state = ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_00000002.pth")
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_and_resumes_identically(
    tiny_reference_run: Path, ct3m_shards: Path, tmp_path: Path, make_tiny_cfg, metrics_of, reference_overrides,
    reference_cli,
    repo_root: Path,
) -> None:
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "pretrain.train", *reference_cli(out, ct3m_shards, "--resume", "auto")]
    proc = subprocess.Popen(cmd, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 75, log  # checkpointed but not finished: SLURM afterok must not fire
    assert "SIGUSR1 received: checkpointed at iteration" in log, log
    stopped = ckpt_io.list_checkpoints(out / "checkpoints")[-1][0]
    assert stopped < 8 and len(metrics.read_text().splitlines()) == stopped  # nothing lost but the current step
    assert not (out / "teacher_backbone.pth").exists()

    result = train(make_tiny_cfg(ct3m_shards, out, *reference_overrides), resume="auto")
    assert result.finished
    for a, b in zip(metrics_of(tiny_reference_run), metrics_of(out), strict=True):
        assert a["total_loss"] == b["total_loss"], a["iteration"]


def test_signal_during_setup_is_caught_and_checkpointed(ct3m_shards: Path, tmp_path: Path, make_tiny_cfg, monkeypatch) -> None:
    """SLURM's SIGUSR1 arriving while the run is still being set up (here: while the optimizer is built) is caught,
    not left to its default action (process killed): the run does one iteration, checkpoints and stops."""
    import pretrain.train.loop as loop

    leaked: list[int] = []

    def stand_in(signum, frame):  # where the signal would go (the default action: kill) if the trainer missed it
        leaked.append(signum)

    previous = signal.signal(signal.SIGUSR1, stand_in)
    real = loop.build_optimizer

    def build_then_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGUSR1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "build_optimizer", build_then_signal)
    try:
        result = train(make_tiny_cfg(ct3m_shards, tmp_path, "train.iterations=4"))
        after = signal.getsignal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not leaked
    assert result.preempted and not result.finished and result.iteration == 1
    assert [i for i, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert after is stand_in  # the trainer put back the handler it found


def test_stage3_batches_mix_resolutions_as_configured(ct3m_shards: Path, tmp_path: Path, make_tiny_cfg) -> None:
    from pretrain.data import build_ssl_loader

    cfg = make_tiny_cfg(ct3m_shards, tmp_path, stage_files=("stage3.yaml",))
    # the shipped stage-3 mix, each size divided by 8 (rounded to the 16 px patch)
    assert list(cfg.crops.global_crops_size) == [64, 96, 96, 96, 96]
    assert list(cfg.crops.local_crops_size) == [16, 16, 16, 32, 48]
    loader = build_ssl_loader(cfg, 0, 1, 0)
    seen = []
    for _ in range(10):
        b = next(loader)
        g, l, gram = (b[k].shape[-1] for k in ("collated_global_crops", "collated_local_crops",
                                               "collated_gram_teacher_crops"))
        assert b["collated_masks"].shape[1] == (g // 16) ** 2
        seen.append((g, l, gram))
    paired = set(zip(cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.gram_teacher_crops_size))
    assert set(seen) <= paired, seen  # sizes drawn as pairs, the Gram teacher at 1.5x the global crop
    assert {g for g, _, _ in seen} == {64, 96}, seen  # both resolutions within 10 batches


@pytest.mark.slow
def test_pipeline_chains_stage2_and_stage3_after_stage1(
    tiny_reference_run: Path, ct3m_shards: Path, tmp_path: Path, metrics_of
) -> None:
    from pretrain.pipeline import main

    from pretrain.train.config import default_config_dir, load_config, tiny_overrides

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_reference_run, run_dir / "stage1")  # the finished tiny stage 1 (8 iterations)
    # the shipped stage configs, each with its sizes shrunk as the reference run's (per-stage dot-lists)
    # (stage 1 as the reference run was made, so the pipeline finds it finished and skips it)
    sizes = [f"stage{n}:{o}" for n, its in ((1, 8), (2, 3), (3, 4)) for o in tiny_overrides(
        load_config(default_config_dir() / f"stage{n}.yaml"), iterations=its,
        gram_teacher_iteration=8 if n > 1 else None)]
    args = ["--run-dir", str(run_dir), f"data.shards={ct3m_shards}", *sizes]
    rc = main(args)
    assert rc == 0
    s2, s3 = metrics_of(run_dir / "stage2"), metrics_of(run_dir / "stage3")
    assert len(s2) == 3 and len(s3) == 4
    for r in s2 + s3:
        for k in (*STAGE1_TERMS, "gram_loss"):
            assert math.isfinite(r[k]), (r["iteration"], k)
    # stage 2 ramps the Gram weight 0 -> 2 over its first iterations (DINOv3), stage 3 keeps 2
    assert s2[0]["gram_weight"] == 0.0 and s2[-1]["gram_weight"] == 2.0
    assert all(r["gram_weight"] == 2.0 for r in s3)
    assert {r["global_crops_size"] for r in s2} == {32}  # 256 / 8
    assert {r["global_crops_size"] for r in s3} <= {64, 96}  # 512-768 / 8

    # stage 2 continued from stage 1's final checkpoint; its Gram teacher is the stage-1 EMA teacher at 8
    s2_ckpt = ckpt_io.load_checkpoint(run_dir / "stage2" / "checkpoints" / "checkpoint_00000003.pth")
    snap = torch.load(run_dir / "stage1" / "teacher_snapshots" / "teacher_backbone_00000008.pth", weights_only=True)
    assert all(torch.equal(s2_ckpt["gram_teacher"][k], v) for k, v in snap.items())
    # stage 3's Gram teacher is the same; the final teacher backbone is exported for finetune
    s3_ckpt = ckpt_io.load_checkpoint(run_dir / "stage3" / "checkpoints" / "checkpoint_00000004.pth")
    assert all(torch.equal(s3_ckpt["gram_teacher"][k], v) for k, v in snap.items())
    final = torch.load(run_dir / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(final[k], s3_ckpt["teacher"]["backbone." + k]) for k in final)
    # re-running the finished pipeline skips every stage
    assert main(args) == 0


def test_stage3_starts_student_and_teacher_from_the_stage2_teacher(
    tiny_reference_run: Path, ct3m_shards: Path, tmp_path: Path, make_tiny_cfg
) -> None:
    from pretrain.train.stage_init import initialise_weights
    from pretrain.train.meta_arch import SSLMetaArch

    ckpt = tiny_reference_run / "checkpoints" / "checkpoint_00000008.pth"
    cfg = make_tiny_cfg(ct3m_shards, tmp_path, f"init.checkpoint={ckpt}", stage_files=("stage3.yaml",))
    assert cfg.init.mode == "from_teacher"
    meta = SSLMetaArch.from_config(cfg)
    initialise_weights(meta, cfg, None)
    teacher = ckpt_io.load_checkpoint(ckpt)["teacher"]
    for tree in (meta.student, meta.teacher):
        assert all(torch.equal(v, teacher[k]) for k, v in tree.state_dict().items())


def test_gradient_accumulation_reaches_the_global_batch(ct3m_shards: Path, tmp_path: Path, make_tiny_cfg) -> None:
    cfg = make_tiny_cfg(ct3m_shards, tmp_path, "train.iterations=2", "train.global_batch_size=8",
                        "data.max_batch_size_per_rank=4")
    result = train(cfg)
    assert result.finished
    assert (result.plan.batch_size_per_rank, result.plan.grad_accum_steps) == (4, 2)
    state = ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_00000002.pth")
    assert state["loader"]["batches_consumed"] == 4  # 2 iterations x 2 micro-batches of 4 images
    assert state["plan"]["global_batch"] == 8
    assert result.history[0]["samples_per_s"] > 0 and math.isfinite(result.history[-1]["total_loss"])
    # 6 images with a cap of 4 per rank: 3 per micro-batch, 2 micro-batches (the old rule demanded a multiple of 4)
    odd = make_tiny_cfg(ct3m_shards, tmp_path / "odd", "train.iterations=1", "train.global_batch_size=6",
                        "data.max_batch_size_per_rank=4")
    assert (train(odd).plan.batch_size_per_rank, 2) == (3, 2)


def test_gradients_are_clipped_per_student_module_as_the_official_loop() -> None:
    """DINOv2/v3 clip backbone, DINO head and iBOT head separately: a huge head gradient leaves the backbone's alone."""
    from pretrain.train.optim import clip_student_gradients

    torch.manual_seed(0)
    student = torch.nn.ModuleDict({name: torch.nn.Linear(4, 3) for name in ("backbone", "dino_head", "ibot_head")})
    wanted = {"backbone": 1.0, "dino_head": 1000.0, "ibot_head": 5.0}
    for name, module in student.items():
        grads = [torch.randn_like(p) for p in module.parameters()]
        scale = wanted[name] / math.sqrt(sum(float(g.square().sum()) for g in grads))
        for p, g in zip(module.parameters(), grads):
            p.grad = g * scale
    norms = clip_student_gradients(student, 3.0)
    for name, before in wanted.items():
        assert norms[name] == pytest.approx(before, rel=1e-5)
        after = math.sqrt(sum(float(p.grad.square().sum()) for p in student[name].parameters()))
        assert after == pytest.approx(min(before, 3.0), rel=1e-5), name
    assert norms["total"] == pytest.approx(math.sqrt(sum(v * v for v in wanted.values())), rel=1e-5)
