"""The path a GPU cluster runs is the path these tests run: the shipped stage configs with only sizes shrunk.

Each test pins one defect that the old look-alike tests could not see: the FLOP count leaving the student in eval
mode, compile bypassed by the block calls, a global batch out of reach on real world sizes, a half-finished stage
handed on, SLURM launch hygiene, weights that diverged being saved as "the last good checkpoint", a full disk.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.data.plan import BatchPlanError, plan_batch, plan_from_config
from pretrain.train import checkpointing as ckpt_io
from pretrain.train.config import ConfigError, load_config, tiny_overrides
from pretrain.train.loop import NonFiniteLossError, train
from pretrain.train.meta_arch import SSLMetaArch

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = {s: REPO_ROOT / "configs" / "pretrain" / f"stage{s}.yaml" for s in (1, 2, 3)}


# ---------------------------------------------------------------------------------------------- train mode
def test_student_trains_in_train_mode_with_the_shipped_flop_counting(
    ct3m_shards: Path, tmp_path: Path, make_shipped_cfg, monkeypatch
) -> None:
    """``logging.flops: true`` (shipped) must not leave the student in eval mode: every step runs with drop path,
    RoPE jitter and (stage 3) activation checkpointing active."""
    cfg = make_shipped_cfg(1, ct3m_shards, tmp_path, iterations=3)
    assert cfg.logging.flops and cfg.student.drop_path_rate > 0
    modes: list[bool] = []
    real = SSLMetaArch.forward_backward

    def spy(self, batch, **kw):
        modes.append(all(m.training for m in self.student.modules()))
        assert not self.teacher.training
        return real(self, batch, **kw)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", spy)
    result = train(cfg)
    assert result.finished and modes == [True] * 3
    assert all(r["student_training"] == 1 for r in result.history)
    assert all(r["tflops"] > 0 for r in result.history)  # the count itself still happens


# ---------------------------------------------------------------------------------------------- compile
@pytest.mark.slow
def test_compile_compiles_the_blocks_the_training_step_calls(ct3m_shards: Path, tmp_path: Path, make_shipped_cfg):
    """``compute.compile: true``: dynamo must see frames during training (the blocks used to be called through
    ``forward_list``, which bypasses the compiled ``__call__``: zero frames)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    result = train(make_shipped_cfg(1, ct3m_shards, tmp_path, "compute.compile=true",
                                    iterations=1))
    assert result.finished
    assert counters["frames"]["ok"] > 0, dict(counters["frames"])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- batch plan
@pytest.mark.parametrize("stage, world, per_rank, accum", [
    (1, 8, 64, 1), (1, 32, 16, 1), (1, 4, 64, 2), (1, 1, 64, 8),
    (2, 8, 32, 2), (2, 32, 16, 1),
    (3, 8, 8, 8), (3, 32, 8, 2), (3, 64, 8, 1),
])
def test_every_stage_reaches_the_papers_global_batch(stage: int, world: int, per_rank: int, accum: int) -> None:
    """512 images per iteration in every stage (stage 3 used to train at 8 x world), on the sbatch scripts'
    default 4 x 8 GPUs too (stages 1-2 used to stop with a ValueError there)."""
    plan = plan_from_config(load_config(STAGES[stage]), world)
    assert (plan.global_batch, plan.batch_size_per_rank, plan.grad_accum_steps) == (512, per_rank, accum)
    assert plan.batch_size_per_rank * world * plan.grad_accum_steps == 512


def test_impossible_batch_shapes_are_refused_with_one_line() -> None:
    with pytest.raises(BatchPlanError, match=r"cannot be split over 12 ranks.*8 or 16"):
        plan_batch(512, 12, 64)
    with pytest.raises(BatchPlanError, match="must all be positive"):
        plan_batch(512, 8, 0)
    cfg = load_config(STAGES[3], ["train.global_batch_size=64"])
    with pytest.raises(BatchPlanError, match="KoLeo needs at least 2"):
        plan_from_config(cfg, 64)


def _run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.train", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def test_plan_cli_prints_the_plan_without_data_or_weights() -> None:
    done = _run_cli("--config", str(STAGES[3]), "--plan", "--world-size", "8")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan == {"stage": "stage3", "global_batch": 512, "batch_size_per_rank": 8, "grad_accum_steps": 8,
                    "world_size": 8, "max_batch_size_per_rank": 8, "iterations": 10000, "images_seen": 5_120_000}
    bad = _run_cli("--config", str(STAGES[1]), "--plan", "--world-size", "12")
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "cannot be split over 12 ranks" in bad.stderr
    typo = _run_cli("--config", str(STAGES[1]), "--plan", "optim.lrr=1")
    assert typo.returncode == 2 and "unknown config key optim.lrr (did you mean optim.lr?)" in typo.stderr


# ---------------------------------------------------------------------------------------------- strict configs
def test_config_typos_and_wrong_types_are_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key optim\.lrr \(did you mean optim\.lr\?\)"):
        load_config(STAGES[1], ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"logging\.flops=3 is a number, but logging\.flops takes a bool"):
        load_config(STAGES[1], ["logging.flops=3"])
    with pytest.raises(ConfigError, match=r"optim\.lr='fast' is a string"):
        load_config(STAGES[1], ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown config key data.batch_size_per_rank"):
        load_config(STAGES[1], ["data.batch_size_per_rank=8"])  # the old key: now the plan decides
    # open and nullable blocks still take what they are for
    cfg = load_config(STAGES[1], ["student.overrides.depth=4", "schedules.gram_weight={start: 0, peak: 1, end: 1, "
                                  "warmup_epochs: 0}", "optim.clip_grad=null", "crops.global_crops_size=[64,96]"])
    assert cfg.student.overrides.depth == 4 and cfg.optim.clip_grad is None


def test_tiny_sizes_change_sizes_only() -> None:
    """What the tests and ``preflight --tiny`` shrink: never a recipe switch."""
    for stage, path in STAGES.items():
        full = load_config(path)
        keys = {o.split("=", 1)[0] for o in tiny_overrides(full, gram_teacher_iteration=2)}
        recipe = {"student.drop_path_rate", "compute.compile", "compute.activation_checkpointing", "logging.flops",
                  "compute.precision", "compute.distributed", "dino.koleo_loss_weight", "optim.lr"}
        assert not keys & recipe, (stage, keys & recipe)
        assert all(k.split(".")[0] in ("student", "dino", "ibot", "crops", "train", "data", "checkpointing", "gram")
                   for k in keys), keys


# ---------------------------------------------------------------------------------------------- fidelity
def test_stage_configs_carry_the_decided_dinov3_values() -> None:
    s1, s2, s3 = (load_config(STAGES[s]) for s in (1, 2, 3))
    assert [c.dino.koleo_loss_weight for c in (s1, s2, s3)] == [0.1, 0.1, 0.1]
    assert s1.optim.lr == 2e-4 and s1.optim.scaling_rule == "none"
    assert s2.crops.gram_teacher_no_distortions and s3.crops.gram_teacher_no_distortions
    assert s2.schedules.lr.end is None and s3.schedules.lr.end is None  # constant after the warm-up
    assert s2.schedules.gram_weight.end == s2.gram.loss_weight == 2.0
    assert s2.schedules.dino_local_weight.end == 0.5 and s3.schedules.dino_local_weight.peak == 0.5
    assert s3.compute.activation_checkpointing and s1.compute.tf32


def test_prototype_layer_is_trunc_normal_as_the_official_head() -> None:
    from pretrain.models.heads import DINOHead

    torch.manual_seed(0)
    w = DINOHead(64, out_dim=4096, hidden_dim=64, bottleneck_dim=256).last_layer.weight
    assert float(w.std()) == pytest.approx(0.02, rel=0.03)  # nn.Linear's default would give 1/sqrt(3*256) = 0.036
    assert abs(float(w.mean())) < 1e-3


# ---------------------------------------------------------------------------------------------- completion
def test_preempted_stage_is_not_handed_on(ct3m_shards: Path, tmp_path: Path, make_shipped_cfg, monkeypatch) -> None:
    """A stage that stopped early has checkpoints but no completion record; the next stage refuses it (the SLURM
    scripts and pretrain.pipeline both read that record)."""
    from pretrain.pipeline import final_checkpoint
    from pretrain.train.preemption import PreemptionHandler

    run = tmp_path / "run"
    handler = PreemptionHandler()
    handler.requested, handler.signal_name = True, "SIGUSR1"
    result = train(make_shipped_cfg(1, ct3m_shards, run / "stage1"), preempt=handler)
    assert result.preempted and not result.finished and result.iteration == 1
    assert ckpt_io.list_checkpoints(run / "stage1" / "checkpoints") and ckpt_io.read_completion(run / "stage1") is None
    with pytest.raises(FileNotFoundError, match="stage 1 has not finished"):
        final_checkpoint(run, 1)
    env = {**os.environ, "MEDDINO_OUTPUT_ROOT": str(run), "MEDDINO_PYTHON": sys.executable}
    env.pop("SLURM_JOB_ID", None)
    refused = subprocess.run(["bash", str(REPO_ROOT / "slurm" / "stage2.sh")], env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "which has not completed" in refused.stderr, refused.stderr

    finished = train(make_shipped_cfg(1, ct3m_shards, run / "stage1"), resume="auto")
    assert finished.finished
    record = ckpt_io.read_completion(run / "stage1")
    assert record["iteration"] == 4 and final_checkpoint(run, 1) == Path(record["final_checkpoint"])


def test_preemption_handler_is_installed_before_torch_is_imported(ct3m_shards: Path, tmp_path: Path) -> None:
    """A USR1 that arrives while ``python -m pretrain.train`` is still importing torch (short ``--time`` jobs) is
    caught: the run checkpoints after its first iteration and exits 75 (not killed by the default action)."""
    from pretrain.train.config import tiny_overrides

    sizes = tiny_overrides(load_config(STAGES[1]), iterations=4)
    cmd = [sys.executable, "-X", "importtime", "-m", "pretrain.train", "--config", str(STAGES[1]), "--output-dir",
           str(tmp_path / "run"), *sizes, f"data.shards={ct3m_shards}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # -X importtime reports each module as its import finishes: signal once the handler module is imported,
    # while torch is not yet
    seen = ""
    while "pretrain.train.preemption" not in seen:
        line = proc.stderr.readline()
        assert line, f"the trainer ended before importing its preemption handler: {proc.communicate()}"
        seen += line
    seen += proc.stderr.readline()  # one more import finished: install() has run
    assert "| torch\n" not in seen
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, (proc.returncode, out, err[-3000:])
    assert "SIGUSR1 received: checkpointed at iteration 1" in out


# ---------------------------------------------------------------------------------------------- SLURM scripts
@pytest.mark.parametrize("left, lead", [("5:00", 30), ("10:00", 60), ("1:00:00", 360), ("2-00:00:00", 600),
                                        ("UNLIMITED", None)])
def test_preemption_warning_scales_with_the_time_limit(tmp_path: Path, left: str, lead: int | None) -> None:
    """slurm/common.sh: USR1 a tenth of the time left before the limit, within [30, 600] s (a fixed 600 s warning
    fired at once in jobs of 10 minutes or less)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text(f"#!/bin/sh\necho '{left}'\n")
    (fake / "squeue").chmod(0o755)
    script = (f'source "{REPO_ROOT}/slurm/common.sh"; left="$(meddino_time_left_s)"; '
              'if [ -n "$left" ]; then echo "$left $(meddino_signal_lead_s "$left")"; else echo none; fi')
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "1"})
    assert done.returncode == 0, done.stderr
    if lead is None:
        assert done.stdout.strip() == "none"
    else:
        seconds, got = map(int, done.stdout.split())
        assert got == lead and seconds > got
    for stage in (1, 2, 3):
        assert "--signal=USR1@600" not in "".join(
            line for line in (REPO_ROOT / "slurm" / f"stage{stage}.sh").read_text().splitlines(True)
            if line.startswith("#SBATCH"))


# ---------------------------------------------------------------------------------------------- faults
def test_diverged_weights_are_never_saved_as_the_last_good_checkpoint(
    ct3m_shards: Path, tmp_path: Path, make_shipped_cfg, monkeypatch
) -> None:
    """A step that leaves NaN weights (with a finite loss at that step) used to be checkpointed, so the "last good
    checkpoint" named in the error held the diverged weights and resuming failed again."""
    cfg = make_shipped_cfg(1, ct3m_shards, tmp_path, "checkpointing.period=1")
    real = SSLMetaArch.update_teacher
    calls = []

    def poison_after_second_step(self, momentum):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(self.student["backbone"].parameters()).fill_(float("nan"))
        return real(self, momentum)

    monkeypatch.setattr(SSLMetaArch, "update_teacher", poison_after_second_step)
    with pytest.raises(NonFiniteLossError, match=r"non-finite student weights at iteration 2.*checkpoint_00000001"):
        train(cfg)
    assert [i for i, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == [1]
    state = ckpt_io.load_checkpoint(tmp_path / "checkpoints" / "checkpoint_00000001.pth")
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_full_disk_while_checkpointing_is_one_line_and_keeps_earlier_checkpoints(
    ct3m_shards: Path, tmp_path: Path, make_shipped_cfg, monkeypatch
) -> None:
    import builtins
    import errno

    class FullDisk:
        """A file that takes 4 KiB, then fails as a full disk does."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    cfg = make_shipped_cfg(1, ct3m_shards, tmp_path, "checkpointing.period=1")
    train(cfg)  # 4 finished iterations, checkpoints 2-4 kept (keep_last 3)
    cfg = make_shipped_cfg(1, ct3m_shards, tmp_path, "checkpointing.period=1", iterations=6)
    import meddino_common.atomic as atomic  # where every atomic write opens its file

    monkeypatch.setattr(atomic, "open", lambda p, mode="r", *a, **k: FullDisk(builtins.open(p, mode, *a, **k))
                        if "checkpoint_" in str(p) else builtins.open(p, mode, *a, **k), raising=False)
    with pytest.raises(ckpt_io.CheckpointWriteError) as info:
        train(cfg, resume="auto")
    message = str(info.value)
    assert "checkpoint_00000005.pth: No space left on device" in message and "\n" not in message
    assert [i for i, _ in ckpt_io.list_checkpoints(tmp_path / "checkpoints")] == [2, 3, 4]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_temporary_files_of_a_killed_write_are_removed_at_start(ct3m_shards: Path, tmp_path: Path,
                                                                make_shipped_cfg) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = ckpts / ".checkpoint_00000002.pth.tmp-4242"
    stale.write_bytes(b"half a checkpoint")
    train(make_shipped_cfg(1, ct3m_shards, tmp_path, iterations=1))
    assert not stale.exists()


def test_resume_with_the_shipped_loader_workers_is_bit_identical(ct3m_shards: Path, tmp_path: Path,
                                                                  make_shipped_cfg) -> None:
    """The shipped loader runs worker processes; creating it must not draw from the training RNG stream, or a
    run resumed at iteration k differs from the uninterrupted one (the old tests used 0 workers and missed it)."""
    cfg = make_shipped_cfg(1, ct3m_shards, tmp_path, "checkpointing.period=2", iterations=4)
    assert cfg.data.num_workers >= 1 and cfg.logging.flops
    straight = train(cfg, output_dir=tmp_path / "straight")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    name = ckpt_io.checkpoint_path("", 2).name
    (tmp_path / "resumed" / "checkpoints" / name).write_bytes((tmp_path / "straight" / "checkpoints" / name).read_bytes())
    resumed = train(cfg, output_dir=tmp_path / "resumed", resume="auto")
    assert [r["total_loss"] for r in straight.history[2:]] == [r["total_loss"] for r in resumed.history]


def test_compile_auto_is_on_for_gpus_only() -> None:
    from pretrain.train.parallel import compile_enabled

    assert load_config(STAGES[1]).compute.compile == "auto"
    assert compile_enabled("auto", torch.device("cuda", 0)) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda", 0))
    assert load_config(STAGES[1], ["compute.compile=true"]).compute.compile is True


def test_an_output_dir_that_is_a_file_or_not_writable_is_one_line(ct3m_shards: Path, tmp_path: Path, as_unprivileged):
    import stat

    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    for out, expected in ((blocker, "is a file, not a folder"), (tmp_path / "locked" / "run", "cannot create")):
        if out.parent.name == "locked":
            out.parent.mkdir()
            out.parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
        sizes = tiny_overrides(load_config(STAGES[1]), iterations=1)
        cmd = [sys.executable, "-m", "pretrain.train", "--config", str(STAGES[1]), "--output-dir", str(out), *sizes,
               f"data.shards={ct3m_shards}"]
        done = subprocess.run([*as_unprivileged, *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_or_unreadable_checkpoints_are_one_line(ct3m_shards: Path, tmp_path: Path) -> None:
    """--resume / --init-from naming a missing file, or a checkpoint that is text: one line, exit 2."""
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    sizes = tiny_overrides(load_config(STAGES[1]), iterations=1)
    for extra, expected in ((["--resume", str(tmp_path / "gone.pth")], "no such checkpoint file"),
                            (["--init-from", str(tmp_path / "gone.pth")], "initial weights not found"),
                            (["--resume", str(text)], "cannot read checkpoint")):
        done = _run_cli("--config", str(STAGES[1]), "--output-dir", str(tmp_path / "run"), *extra, *sizes,
                        f"data.shards={ct3m_shards}", timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_config_values_refused_at_set_up_are_one_line(ct3m_shards: Path, tmp_path: Path) -> None:
    """Values the loader cannot type-check (a schedule block given without all its keys, a patch size the backbone
    does not have, an unknown init.mode) are refused where they are read, as one line with exit 2."""
    sizes = tiny_overrides(load_config(STAGES[1]), iterations=1)
    for extra, expected in ((["schedules.gram_weight={start: 0, peak: 2}"],
                             "schedules.gram_weight lacks end, warmup_epochs, cosine_epochs"),
                            (["crops.patch_size=14"], "crops.patch_size=14 differs from the backbone patch size 16"),
                            ([f"init.checkpoint={tmp_path / 'any.pth'}", "init.mode=sideways"],
                             "init.mode must be one of continue, from_teacher, got 'sideways'")):
        done = _run_cli("--config", str(STAGES[1]), "--output-dir", str(tmp_path / "run"), *sizes,
                        f"data.shards={ct3m_shards}", *extra, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
