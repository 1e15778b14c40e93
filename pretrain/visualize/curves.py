"""Training curves: every loss term, schedule and diagnostic of one or several ``metrics.jsonl`` files against the
iteration (the pretraining trainer's and finetune.train's logs), one panel per key, one line per run.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from meddino_common.figures import save_png  # noqa: E402


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a trainer ``metrics.jsonl`` (one JSON object per logged iteration).

    Blank lines are skipped; a truncated LAST line (a run still writing) is dropped with a warning; any
    other malformed line is an error naming the file and line. Records without ``iteration`` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number}: ignoring incomplete last line", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if "iteration" in record:
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records with an 'iteration' field")
    return records


def _numeric(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def metric_series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations [N], values [N, K]) for ``key`` over the records that carry a numeric value for it.

    A scalar gives K = 1; a list of numbers (the finetune log's per-group ``lr`` or per-class
    ``pseudo_dice``) gives one column per element, NaN-padded to the longest list. Non-finite values
    (NaN, inf, JSON null) become NaN so a diverged run shows as a marked gap.
    """
    iters, rows = [], []
    for record in records:
        value = record.get(key, "absent")
        if _numeric(value):
            row = [value]
        elif isinstance(value, list) and value and all(_numeric(v) for v in value):
            row = list(value)
        else:
            continue
        iters.append(float(record["iteration"]))
        rows.append([math.nan if v is None or not math.isfinite(v) else float(v) for v in row])
    width = max((len(r) for r in rows), default=1)
    values = np.full((len(rows), width), math.nan)
    for n, row in enumerate(rows):
        values[n, : len(row)] = row
    return np.asarray(iters), values


def curve_keys(runs: Sequence[Sequence[dict[str, Any]]], loss_keys: Sequence[str], other_keys: Sequence[str]) -> list[str]:
    """Panels to draw: known loss keys present, then other ``*_loss`` keys (sorted), then ``other_keys``
    (schedules, diagnostics) present."""
    present: set[str] = set()
    for records in runs:
        for record in records:
            present.update(k for k, v in record.items() if _numeric(v) or (isinstance(v, list) and v))
    keys = [k for k in loss_keys if k in present]
    keys += sorted(k for k in present if k.endswith("_loss") and k not in keys)
    keys += [k for k in other_keys if k in present]
    return keys


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (NaN-aware; window 1 returns the input)."""
    if window <= 1 or values.size == 0:
        return values
    out = np.empty_like(values)
    for k in range(values.size):
        chunk = values[max(0, k - window + 1): k + 1]
        finite = chunk[np.isfinite(chunk)]
        out[k] = finite.mean() if finite.size else math.nan
    return out


def curves_figure(
    runs: dict[str, Sequence[dict[str, Any]]],
    loss_keys: Sequence[str],
    other_keys: Sequence[str],
    columns: int,
    smoothing_window: int,
    panel_in: float,
) -> Figure:
    """One panel per metric key, one line per run (label -> records) and per list element."""
    keys = curve_keys(list(runs.values()), loss_keys, other_keys)
    if not keys:
        raise ValueError("no loss or schedule values found in the metrics records")
    n_cols = min(columns, len(keys))
    n_rows = math.ceil(len(keys) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(panel_in * 1.3 * n_cols, panel_in * n_rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(keys):]:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys):
        n_lines = 0
        for label, records in runs.items():
            iters, table = metric_series(records, key)
            if iters.size == 0:
                continue
            order = np.argsort(iters, kind="stable")
            iters, table = iters[order], table[order]
            for column in range(table.shape[1]):
                values = table[:, column]
                name = label if table.shape[1] == 1 else f"{label} [{column}]" if len(runs) > 1 else f"[{column}]"
                n_lines += 1
                if smoothing_window > 1:
                    (raw,) = ax.plot(iters, values, alpha=0.25, linewidth=0.8)
                    ax.plot(iters, moving_average(values, smoothing_window), color=raw.get_color(), label=name)
                else:
                    ax.plot(iters, values, label=name, marker="." if iters.size < 30 else None)
                bad = ~np.isfinite(values)
                if bad.any():
                    # on the bottom edge of the panel (x in data, y in axes units): the scale stays intact
                    ax.plot(iters[bad], np.full(bad.sum(), 0.02), "x", color="red", clip_on=False,
                            transform=ax.get_xaxis_transform(), label=f"{name}: non-finite")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if key in ("lr", "wd"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if n_lines > 1:
            ax.legend(fontsize=7)
    return fig


def write_curves_png(runs: dict[str, Sequence[dict[str, Any]]], out_path: str | Path, cfg: DictConfig) -> Path:
    """``curves_figure`` of ``runs`` (label -> records) with the ``curves`` block of the visualisation config -> PNG."""
    fig = curves_figure(
        runs, list(cfg.curves.loss_keys), [*cfg.curves.schedule_keys, *cfg.curves.diagnostic_keys],
        int(cfg.curves.columns), int(cfg.curves.smoothing_window), float(cfg.panel_size_in),
    )
    return save_png(fig, out_path, int(cfg.dpi))
