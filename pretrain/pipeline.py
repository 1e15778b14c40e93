"""Run the three MedDINOv3 pretraining stages in order: ``python -m pretrain.pipeline --run-dir DIR``.

Layout of the run directory (the convention each stage uses to find its predecessor)::

    DIR/stage1/  checkpoints/checkpoint_<iters>.pth, teacher_snapshots/teacher_backbone_<N>.pth, ...
    DIR/stage2/  continues from stage 1's final checkpoint (student, teacher[, optimizer]); Gram teacher =
                 stage 1's EMA teacher snapshot at gram.teacher.iteration
    DIR/stage3/  student and teacher initialised from stage 2's final teacher; same Gram teacher
    DIR/teacher_backbone.pth   the final (stage-3) EMA teacher backbone, official DINOv3 layout: the MedDINOv3
                               checkpoint ``finetune`` consumes

Each stage config is ``base.yaml + stage<i>.yaml [+ <overlay>.yaml + <overlay>_stage<i>.yaml]`` plus the command
line overrides (``key=value`` for every stage, ``stage2:key=value`` for one stage). A finished stage is skipped, an
interrupted one resumes from its latest checkpoint, so re-running the same command continues the pipeline.
Explicit ``--stage1-checkpoint`` / ``--stage2-checkpoint`` replace the convention.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from meddino_common.atomic import atomic_write_to_path
from pretrain.train import checkpointing as ckpt_io
from pretrain.train.config import default_config_dir, load_config
from pretrain.train.distributed import barrier, destroy, is_main_process
from pretrain.train.loop import NonFiniteLossError, train

EXIT_PREEMPTED = 75  # as python -m pretrain.train: checkpointed, not finished

STAGES = (1, 2, 3)


def stage_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}"


def final_checkpoint(run_dir: Path, stage: int) -> Path:
    """The final checkpoint named by the stage's completion record; a clear error when the stage has not
    finished (a preempted or failed stage has checkpoints but no record)."""
    record = ckpt_io.read_completion(stage_dir(run_dir, stage))
    if record is None:
        ckpts = ckpt_io.list_checkpoints(stage_dir(run_dir, stage) / "checkpoints")
        latest = ckpts[-1][0] if ckpts else None
        raise FileNotFoundError(
            f"stage {stage} has not finished in {stage_dir(run_dir, stage)} (no {ckpt_io.COMPLETE_NAME}; latest "
            f"checkpoint at iteration {latest}). Run that stage first (or pass --stage{stage}-checkpoint)."
        )
    return Path(record["final_checkpoint"])


def stage_config(args, stage: int, run_dir: Path):
    cfg_dir = Path(args.config_dir)
    files = [cfg_dir / f"stage{stage}.yaml"]
    if args.overlay:
        for name in (f"{args.overlay}.yaml", f"{args.overlay}_stage{stage}.yaml"):
            if (cfg_dir / name).is_file():
                files.append(cfg_dir / name)
    common = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
    specific = [o.split(":", 1)[1] for o in args.overrides if o.split("=", 1)[0].startswith(f"stage{stage}:")]
    cfg = load_config(files, [*common, *specific])
    cfg.stage = f"stage{stage}"
    return cfg


def previous_stage_checkpoint(args, run_dir: Path, stage: int) -> Path:
    explicit = getattr(args, f"stage{stage - 1}_checkpoint")
    if explicit:
        return Path(explicit)
    return final_checkpoint(run_dir, stage - 1)


def run_stage(args, stage: int, run_dir: Path) -> Path:
    """Run (or skip when finished / resume when interrupted) one stage; returns its exported teacher backbone."""
    cfg = stage_config(args, stage, run_dir)
    out = stage_dir(run_dir, stage)
    exported = out / "teacher_backbone.pth"
    record = ckpt_io.read_completion(out)
    if record is not None and record["iteration"] == int(cfg.train.iterations) and exported.is_file():
        if is_main_process():
            print(f"[pipeline] stage {stage} already finished in {out}: skipped", flush=True)
        return exported
    init_from = None
    if stage == 1:
        init_from = args.init_from
    else:
        cfg.init.checkpoint = str(previous_stage_checkpoint(args, run_dir, stage))
        cfg.init.mode = "continue" if stage == 2 else "from_teacher"
        if cfg.gram.use_loss and cfg.gram.teacher.source == "stage1_iteration" and not cfg.gram.teacher.run_dir:
            cfg.gram.teacher.run_dir = str(stage_dir(run_dir, 1))
    result = train(cfg, output_dir=out, init_from=init_from, resume="auto")
    if not result.finished:
        print(f"[pipeline] stage {stage} stopped at iteration {result.iteration} (preempted); re-run the same "
              "command to continue", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED)
    return exported


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="root of the three stage folders")
    p.add_argument("--config-dir", default=str(default_config_dir()), help="folder with base/stage1-3 YAML files")
    p.add_argument("--overlay", default=None, help="e.g. 'tiny': also merge tiny.yaml and tiny_stage<i>.yaml")
    p.add_argument("--stages", default="1,2,3", help="comma-separated subset of 1,2,3 (in order)")
    p.add_argument("--init-from", default=None, help="stage-1 initial backbone (e.g. official DINOv3 ViT-B/16 .pth)")
    p.add_argument("--stage1-checkpoint", default=None, help="explicit stage-1 final checkpoint for stage 2")
    p.add_argument("--stage2-checkpoint", default=None, help="explicit stage-2 final checkpoint for stage 3")
    p.add_argument("overrides", nargs="*", help="key=value for all stages, stageN:key=value for one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    if any(s not in STAGES for s in stages) or stages != sorted(stages):
        raise SystemExit(f"--stages must be an increasing subset of 1,2,3, got {args.stages!r}")
    try:
        exported = None
        for stage in stages:
            exported = run_stage(args, stage, run_dir)
        if exported is not None and stages[-1] == 3 and is_main_process():
            final = run_dir / "teacher_backbone.pth"
            atomic_write_to_path(final, lambda tmp: shutil.copyfile(exported, tmp))
            print(f"[pipeline] MedDINOv3 teacher backbone: {final}", flush=True)
        barrier()
    except NonFiniteLossError as err:
        print(f"[pipeline] ERROR: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
