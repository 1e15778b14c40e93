"""``python -m pretrain.train --config configs/pretrain/stage1.yaml [--output-dir DIR] [--init-from PATH]
[--resume auto] [key=value ...]``; ``--plan [--world-size W]`` prints the batch plan as JSON and exits.

Exit status: 0 only when the stage reached its last iteration and wrote its final export (so SLURM's ``afterok``
means "finished"); 75 when it stopped early on a preemption signal after checkpointing (resume with
``--resume auto``; under SLURM the job was requeued when the log says so); 2 for a configuration the run cannot
use (one line naming it); 3 when a loss, gradient or weight became non-finite.
"""
from __future__ import annotations

# SLURM's warning signal (--signal=USR1@...) can arrive while torch is still being imported: catch it first, with
# nothing but the standard library loaded, and hand the same handler to the trainer.
from pretrain.train.preemption import PreemptionHandler

_PREEMPT = PreemptionHandler()
if __name__ == "__main__":  # run as a program; imported (tests, console script), main() installs it
    _PREEMPT.install()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed, not finished
EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="python -m pretrain.train --config configs/pretrain/stage1.yaml [--output-dir DIR] "
              "[--init-from WEIGHTS] [--resume auto] [--plan [--world-size W]] [key=value ...]",
    )
    p.add_argument("--config", action="append", required=True,
                   help="stage/experiment YAML merged over configs/pretrain/base.yaml; repeat to stack files")
    p.add_argument("--output-dir", default=None, help="run directory (default: train.output_dir)")
    p.add_argument("--init-from", default=None,
                   help="initial backbone weights: any file pretrain.models.load_backbone reads, or our checkpoint")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in the output dir, if any) or a file")
    p.add_argument("--plan", action="store_true",
                   help="print the batch plan (global batch, per-rank batch, accumulation, images seen) as JSON "
                        "and exit, without data or weights; non-zero with a one-line reason if it is impossible")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --plan: the number of ranks to plan for (default: this launch's world size)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (OmegaConf dot-list)")
    return p.parse_args(argv)


def print_plan(cfg, world_size: int) -> None:
    from pretrain.data.plan import plan_from_config  # noqa: PLC0415

    plan = plan_from_config(cfg, world_size)
    print(json.dumps({"stage": str(cfg.stage), **plan.to_dict()}, indent=1), flush=True)


def main(argv=None) -> int:
    if not _PREEMPT.installed:  # the meddino-pretrain console script: still before torch is imported
        _PREEMPT.install()
    args = parse_args(argv)
    from pretrain.data.plan import BatchPlanError  # noqa: PLC0415
    from pretrain.train.config import ConfigError, load_config  # noqa: PLC0415

    try:
        cfg = load_config(args.config, args.overrides)
        if args.plan:
            from pretrain.train.distributed import read_dist_env  # noqa: PLC0415

            print_plan(cfg, args.world_size or read_dist_env().world_size)
            return 0
    except (ConfigError, BatchPlanError) as err:
        print(f"[pretrain] error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    if not bool(cfg.train.handle_preemption):
        _PREEMPT.uninstall()
    from pretrain.train.checkpointing import CheckpointReadError, CheckpointWriteError  # noqa: PLC0415
    from pretrain.train.distributed import destroy  # noqa: PLC0415
    from pretrain.train.loop import NonFiniteLossError, train  # noqa: PLC0415

    try:
        result = train(cfg, output_dir=args.output_dir, init_from=args.init_from, resume=args.resume,
                       preempt=_PREEMPT if cfg.train.handle_preemption else None)
    except (BatchPlanError, ConfigError, CheckpointWriteError, CheckpointReadError, NotADirectoryError,
            FileNotFoundError) as err:  # missing --init-from / --resume files, unreadable checkpoints, full disk
        print(f"[pretrain] error: {err}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    except NonFiniteLossError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    finally:
        destroy()
    if result.finished:
        return 0
    print(f"[pretrain] stopped at iteration {result.iteration} of {cfg.train.iterations} (checkpointed"
          f"{'; SLURM job requeued' if result.requeued else '; not requeued'}): exit {EXIT_PREEMPTED}, "
          "not finished", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
