"""``python -m pretrain.preflight --out DIR``: prove in minutes that this machine or cluster can run every stage.

    python -m pretrain.preflight --out runs/preflight [--stages 1,2,3] [--no-finetune] [--tiny] [--iterations N]
        [--config-dir configs] [key=value ...]
    torchrun --nproc-per-node 8 -m pretrain.preflight --out runs/preflight      # or under srun (slurm/preflight.sh)

For each requested stage it takes the stage's real config (the shipped ``stage<N>.yaml`` plus the overrides;
``--tiny`` shrinks sizes only, :func:`pretrain.train.config.tiny_overrides`) with its precision, distributed mode,
compile and activation checkpointing, and:

- prints the batch plan for this world size (as ``python -m pretrain.train --plan``);
- trains ``--iterations`` iterations on real CT (``data.shards`` when given, else CT-3M shards curated into DIR
  from the CT sample embedded in the repository), stages chained as in a real run (stage 2 continues stage 1 with
  its EMA-teacher snapshot as Gram teacher, stage 3 continues stage 2);
- checks that the student trains in train mode (drop path, RoPE jitter, checkpointing active), every loss is
  finite, the per-iteration collectives run on the training device (any failure stops the stage with its
  reason), and that resuming from the checkpoint written half way reproduces the remaining iterations (bitwise on
  CPU; on GPU within ``RESUME_RTOL``, the largest difference reported);
- measures steady-state images/s and step time (after a warm-up), peak memory (GPU: max allocated and reserved;
  CPU: max RSS), MFU on GPU from the fvcore FLOP count, and the projected wall-clock of the full stage;

then, unless ``--no-finetune``, one finetune training step and one sliding-window inference of the MedDINOv3 Primus
head at the configured patch size (``python -m finetune.preflight``, 896 px; ``--tiny`` shrinks it).
Writes ``DIR/preflight.json``, prints the same as a table, and exits 1 naming every failed check (stage: check:
reason). A failing stage does not stop the others: a later stage then starts from random weights.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data_curation" / "sample_ct" / "totalsegmentator"
RESUME_RTOL = 1e-2  # GPU: bf16 autocast and non-deterministic kernels; the max difference is reported
LOSS_KEYS = ("total_loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "gram_loss")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.preflight", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m pretrain.preflight --out DIR [--stages 1,2,3] [--no-finetune] [--tiny] [--iterations N] "
              "[--config-dir configs] [key=value ...]")
    p.add_argument("--out", required=True, help="working folder: shards, stage runs, preflight.json")
    p.add_argument("--stages", default="1,2,3", help="comma-separated stages to check (default 1,2,3)")
    p.add_argument("--no-finetune", action="store_true", help="skip the finetune step and inference")
    p.add_argument("--tiny", action="store_true",
                   help="shrink sizes only (width, depth, crops, heads, batch, iterations) to run on a CPU")
    p.add_argument("--iterations", type=int, default=6,
                   help="iterations per stage (default 6: a warm-up, then steady state; resume from the middle)")
    p.add_argument("--config-dir", default=str(REPO_ROOT / "configs"),
                   help="folder holding pretrain/stage<N>.yaml and finetune/ (default: the repository's configs)")
    p.add_argument("overrides", nargs="*",
                   help="key=value for every stage (e.g. data.shards=/data/ct3m compute.distributed=fsdp); "
                        "finetune.key=value for the finetune step")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data
def ensure_shards(out: Path, overrides: Sequence[str], comm) -> str:
    """``data.shards`` from the overrides, else CT-3M shards curated by rank 0 from the embedded real CT."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("data.shards=")]
    if given:
        return given[-1]
    shards = out / "ct3m"
    if _is_main():
        if not (shards / "manifest.csv").is_file():
            cmd = [sys.executable, str(REPO_ROOT / "data_curation" / "build_ct3m.py"), "--out", str(shards),
                   "--root", f"folder={SAMPLE}", "--workers", "1"]
            done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"curating the embedded CT sample failed: {done.stderr.strip().splitlines()[-1:]}")
    comm.barrier()
    return str(shards)


def _is_main() -> bool:
    from pretrain.train.distributed import is_main_process

    return is_main_process()


# ---------------------------------------------------------------------------------------------- one stage
def stage_config(args, stage: int, run: Path, shards: str, chain: dict):
    """The shipped stage config + overrides (+ tiny sizes), chained to the earlier stages of this preflight."""
    from pretrain.train.config import load_config, tiny_overrides

    path = Path(args.config_dir) / "pretrain" / f"stage{stage}.yaml"
    user = [o for o in args.overrides if not o.startswith("finetune.")]
    shipped = load_config(path, user)
    n = int(args.iterations)
    half = max(1, n // 2)
    sizes = tiny_overrides(shipped, iterations=n, gram_teacher_iteration=half) if args.tiny else []
    run_overrides = [f"data.shards={shards}", f"train.iterations={n}", f"checkpointing.period={half}",
                     "checkpointing.keep_last=2", f"checkpointing.teacher_snapshots=[{half}]",
                     "logging.console_every=1"]
    if stage > 1:
        if chain.get(stage - 1):
            run_overrides += [f"init.checkpoint={chain[stage - 1]}", f"gram.teacher.run_dir={run / 'stage1'}",
                              f"gram.teacher.iteration={half}"]
            if not chain.get(1):  # stage 1 failed: the Gram teacher is this stage's own EMA teacher
                run_overrides += ["gram.teacher.source=ema"]
        else:
            run_overrides += ["init.checkpoint=null", "gram.teacher.source=ema"]
    return shipped, load_config(path, [*sizes, *user, *run_overrides])  # the user's values win over tiny sizes


def _failed_check(err: BaseException) -> str:
    from pretrain.data.plan import BatchPlanError
    from pretrain.train.loop import NonFiniteLossError

    text = str(err)
    if isinstance(err, BatchPlanError):
        return "plan"
    if isinstance(err, NonFiniteLossError):
        return "loss_finite"
    if "device type" in text or "backend" in text.lower() or "process group" in text.lower():
        return "collectives"
    return "run"


def _steady(values: list[float], n_warmup: int) -> float | None:
    tail = values[n_warmup:] or values[-1:]
    return statistics.median(tail) if tail else None


def check_stage(args, stage: int, run: Path, shards: str, chain: dict, comm) -> dict:
    """Run one stage twice (straight through, then resumed from its middle checkpoint) and measure it."""
    import torch

    from pretrain.data.plan import plan_from_config
    from pretrain.train import checkpointing as ckpt_io
    from pretrain.train.loop import train

    report: dict = {"ok": False, "error": None, "failed": []}
    device = comm.device
    t0 = time.perf_counter()
    try:
        shipped, cfg = stage_config(args, stage, run, shards, chain)
        plan = plan_from_config(cfg, comm_world())
        report["plan"] = plan.to_dict()
        if _is_main():
            print(f"[preflight] stage{stage} batch plan: {json.dumps(report['plan'])}", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = run / f"stage{stage}"
        if _is_main() and out.exists():
            shutil.rmtree(out)
        comm.barrier()
        straight = train(cfg, output_dir=out)
        if not straight.finished:
            raise RuntimeError(f"stage {stage} stopped at iteration {straight.iteration} without finishing")
        history = straight.history
        n_warmup = max(1, len(history) // 3)
        report["iterations"] = len(history)
        report["step_time_s"] = _steady([r["iter_time_s"] for r in history], n_warmup)
        report["img_per_s"] = plan.global_batch / report["step_time_s"]
        mfu = [r["mfu"] for r in history if "mfu" in r]
        report["mfu"] = _steady(mfu, n_warmup) if mfu else None
        report.update(_memory(device))
        report["student_training_mode"] = all(r["student_training"] == 1 for r in history)
        report["drop_path_active"] = report["student_training_mode"] and float(cfg.student.drop_path_rate) > 0
        report["loss_finite"] = all(math.isfinite(r[k]) for r in history for k in LOSS_KEYS if k in r)
        report["collectives"] = f"{device.type} ({comm_world()} ranks)" if comm_world() > 1 else "single process"
        full_images = int(shipped.train.iterations) * int(shipped.train.global_batch_size)
        report["projected_stage_hours"] = full_images / report["img_per_s"] / 3600
        # resume from the middle checkpoint in a fresh folder: the remaining iterations must repeat exactly
        half = int(cfg.checkpointing.period)
        resumed_dir = run / f"stage{stage}_resume"
        if _is_main():
            if resumed_dir.exists():
                shutil.rmtree(resumed_dir)
            (resumed_dir / "checkpoints").mkdir(parents=True)
            shutil.copy2(ckpt_io.checkpoint_path(out / "checkpoints", half),
                         ckpt_io.checkpoint_path(resumed_dir / "checkpoints", half))
        comm.barrier()
        resumed = train(cfg, output_dir=resumed_dir, resume="auto")
        pairs = [(a[k], b[k]) for a, b in zip(history[half:], resumed.history) for k in LOSS_KEYS if k in a]
        diff = max((abs(a - b) for a, b in pairs), default=0.0)
        scale = max((abs(a) for a, _ in pairs), default=1.0)
        report["resume_max_abs_diff"] = diff
        report["resume_identical"] = len(resumed.history) == len(history) - half and (
            diff == 0.0 if device.type == "cpu" else diff <= RESUME_RTOL * scale)
        chain[stage] = str(straight.last_checkpoint)
        failed = [k for k in ("student_training_mode", "loss_finite", "resume_identical") if not report[k]]
        report["failed"] = failed
        report["ok"] = not failed
        if failed:
            report["error"] = f"failed checks: {', '.join(failed)}"
    except Exception as err:  # noqa: BLE001 - one stage's failure is reported, the next stages still run
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        report["failed"] = [_failed_check(err)]
        report["error"] = f"{type(err).__name__}: {first}"
    report["wall_s"] = time.perf_counter() - t0
    return report


def comm_world() -> int:
    from pretrain.train.distributed import get_world_size

    return get_world_size()


def _memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_reserved_gb": None}


# ---------------------------------------------------------------------------------------------- finetune
def check_finetune(args, out: Path) -> dict:
    """``python -m finetune.preflight`` in its own process (pretraining never imports finetuning)."""
    overrides = [o.split(".", 1)[1] for o in args.overrides if o.startswith("finetune.")]
    cmd = [sys.executable, "-m", "finetune.preflight", "--out", str(out / "finetune"), *(["--tiny"] if args.tiny else []),
           *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        report = {"ok": False, "error": f"finetune.preflight exited {done.returncode}: {tail}"}
    report["wall_s"] = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------- report
def format_table(report: dict) -> str:
    cols = ("ok", "img_per_s", "step_time_s", "peak_memory_gb", "mfu", "student_training_mode", "loss_finite",
            "resume_identical", "resume_max_abs_diff", "projected_stage_hours", "wall_s")

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    rows = [("stage", *cols)]
    for name, st in report["stages"].items():
        rows.append((name, *(cell(st.get(c)) for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    ft = report.get("finetune")
    if ft is not None:
        lines.append(f"finetune: ok {cell(ft.get('ok'))}, patch {ft.get('patch_size')}, train step "
                     f"{cell(ft.get('train_step_s'))} s, inference {cell(ft.get('inference_s'))} s for "
                     f"{ft.get('inference_slices')} slices, peak memory {cell(ft.get('peak_memory_gb'))} GB")
    return "\n".join(lines)


def failures(report: dict) -> list[str]:
    """One line per failed check: ``stage2: resume_identical: ...``."""
    lines = []
    for name, st in report["stages"].items():
        for check in st.get("failed") or (["run"] if not st.get("ok") else []):
            lines.append(f"{name}: {check}: {st.get('error')}")
    ft = report.get("finetune")
    if ft is not None and not ft.get("ok"):
        lines.append(f"finetune: {ft.get('error')}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from pretrain.train import distributed as D
    from meddino_common.atomic import atomic_write_text

    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    if not stages or any(s not in (1, 2, 3) for s in stages) or stages != sorted(set(stages)):
        print(f"[preflight] error: --stages must be an increasing subset of 1,2,3, got {args.stages!r}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"[preflight] error: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    dist_env = D.init_distributed(D.read_dist_env())
    device = D.default_device(dist_env)
    comm = D.communicator(device)
    if dist_env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"[preflight] error: cannot create --out {out}: {err.strerror}", file=sys.stderr)
            return 2
    comm.barrier()
    report = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
              "world_size": dist_env.world_size, "torch": torch.__version__, "tiny": bool(args.tiny),
              "iterations": int(args.iterations), "stages": {}, "finetune": None}
    try:
        try:
            shards = ensure_shards(out, args.overrides, comm)
        except Exception as err:  # noqa: BLE001 - reported against every stage
            shards = None
            for stage in stages:
                report["stages"][f"stage{stage}"] = {"ok": False, "failed": ["data"], "error": str(err)}
        chain: dict = {}
        for stage in stages if shards is not None else ():
            report["stages"][f"stage{stage}"] = check_stage(args, stage, out / "runs", shards, chain, comm)
        if not args.no_finetune and dist_env.is_main:
            report["finetune"] = check_finetune(args, out)
        comm.barrier()
    finally:
        D.destroy()
    if not dist_env.is_main:
        return 0 if not failures(report) else 1
    atomic_write_text(out / "preflight.json", json.dumps(report, indent=1) + "\n")
    print(format_table(report), flush=True)
    print(f"[preflight] report: {out / 'preflight.json'}", flush=True)
    failed = failures(report)
    for line in failed:
        print(f"[preflight] FAILED {line}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
