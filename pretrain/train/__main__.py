"""``python -m pretrain.train --config configs/pretrain/stage1.yaml [--output-dir DIR] [--init-from PATH]
[--resume auto] key=value ...``"""
from __future__ import annotations

import argparse
import sys

from pretrain.train.config import load_config
from pretrain.train.distributed import destroy
from pretrain.train.loop import NonFiniteLossError, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__)
    p.add_argument("--config", action="append", required=True,
                   help="stage/experiment YAML merged over configs/pretrain/base.yaml; repeat to stack files")
    p.add_argument("--output-dir", default=None, help="run directory (default: train.output_dir)")
    p.add_argument("--init-from", default=None,
                   help="initial backbone weights: any file pretrain.models.load_backbone reads, or our checkpoint")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in the output dir, if any) or a file")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (OmegaConf dot-list)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, output_dir=args.output_dir, init_from=args.init_from, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"[pretrain] ERROR: {err}", file=sys.stderr, flush=True)
        return 3
    finally:
        destroy()
    return 0 if (result.finished or result.preempted) else 1


if __name__ == "__main__":
    sys.exit(main())
