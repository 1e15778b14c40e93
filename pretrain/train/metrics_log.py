"""Training metrics: console progress (rank 0), ``metrics.jsonl`` (one record per iteration) and TensorBoard."""
from __future__ import annotations

import json
import time
from pathlib import Path

from pretrain.train import checkpointing as ckpt_io


class MetricsLogger:
    """Console progress (rank 0), ``metrics.jsonl`` and optional TensorBoard."""

    def __init__(self, output_dir: Path, cfg, total_iterations: int, start_iteration: int, is_main: bool) -> None:
        self.is_main = is_main
        self.total = total_iterations
        self.start_iteration = start_iteration
        self.every = max(1, int(cfg.logging.console_every))
        self.stage = str(cfg.stage)
        self.path = output_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.last_t, self.last_it = self.t0, start_iteration
        self.tb = None
        if is_main:
            self._truncate_from(start_iteration)
            if bool(cfg.logging.tensorboard):
                try:
                    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
                except ImportError as err:
                    raise ImportError(
                        "logging.tensorboard=true needs the tensorboard package (pip install tensorboard)"
                    ) from err
                self.tb = SummaryWriter(str(output_dir / "tensorboard"))

    def _truncate_from(self, iteration: int) -> None:
        """Drop records of iterations >= ``iteration`` left by an interrupted run (they are recomputed)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", -1) < iteration:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        ckpt_io.write_text(self.path, "".join(l + "\n" for l in keep))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        it = record["iteration"]
        now = time.perf_counter()
        done = it + 1 - self.start_iteration
        its = done / max(now - self.t0, 1e-9)
        record["it_per_s"] = its
        eta = (self.total - it - 1) / max(its, 1e-9)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, it)
        if (it + 1) % self.every == 0 or it + 1 == self.total or it == self.start_iteration:
            losses = " ".join(
                f"{k.replace('_loss', '')} {record[k]:.4f}" for k in sorted(record) if k.endswith("_loss")
            )
            extra = ""
            if "samples_per_s" in record:
                extra += f" | {record['samples_per_s']:.1f} img/s"
            if "mfu" in record:
                extra += f" MFU {100 * record['mfu']:.1f}%"
            elif "tflops" in record:
                extra += f" {record['tflops']:.3f} TFLOP/s"
            print(
                f"[{self.stage}] it {it + 1}/{self.total} | {its:.2f} it/s | ETA {_fmt_time(eta)} | {losses} | "
                f"lr {record['lr']:.3e} wd {record['wd']:.4f} mom {record['mom']:.5f} "
                f"T {record['teacher_temp']:.4f}{extra}",
                flush=True,
            )

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
