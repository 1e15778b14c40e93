"""Fixtures of the pretraining tests: CT-3M-format shards written from a REAL CT volume, and tiny configs.

``write_ct3m_shards`` writes the axial slices of ``totalsegmentator/example_ct.nii.gz`` (a real abdomen/pelvis CT)
as webdataset shards in the CT-3M contract (``ct3m-%06d.tar`` with ``npy`` int16 HU + ``json`` per sample,
``manifest.csv``, ``shards.csv``, ``stats.json``), so the trainer tests run on real CT before/independently of the curation CLI.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_ct3m_shards(ct_path: Path, out_dir: Path, slices_per_shard: int = 40, every: int = 1) -> list[str]:
    """Write CT-3M shards from the axial slices of ``ct_path``; returns the sample keys in write order."""
    import webdataset as wds

    img = nib.as_closest_canonical(nib.load(str(ct_path)))
    vol = np.asarray(img.dataobj).astype(np.float32)  # [x, y, z] RAS, HU
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    out_dir.mkdir(parents=True, exist_ok=True)
    case = ct_path.name.replace(".nii.gz", "").replace(".", "_").replace("_", "-")
    indices = list(range(0, vol.shape[2], every))
    keys, rows = [], []
    for shard_idx, start in enumerate(range(0, len(indices), slices_per_shard)):
        shard = out_dir / f"ct3m-{shard_idx:06d}.tar"
        with wds.TarWriter(str(shard)) as sink:
            for z in indices[start : start + slices_per_shard]:
                hu = np.rot90(vol[:, :, z]).round().clip(-32768, 32767).astype(np.int16)  # rows: anterior first
                key = f"totalseg-{case}-{z:05d}"
                buf = io.BytesIO()
                np.save(buf, hu)
                meta = {
                    "source": "totalsegmentator", "case": case, "slice_index": z,
                    "spacing_mm": [zooms[1], zooms[0]], "slice_spacing_mm": zooms[2],
                    "original_shape": list(hu.shape), "orientation": "RAS",
                }
                sink.write({"__key__": key, "npy": buf.getvalue(), "json": json.dumps(meta).encode()})
                keys.append(key)
                rows.append({"key": key, "shard": shard.name, "source": "totalsegmentator", "case": case,
                             "slice_index": z})
    with open(out_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["key", "shard", "source", "case", "slice_index"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "stats.json").write_text(json.dumps({"n_samples": len(keys), "n_shards": shard_idx + 1}))
    counts = {}
    for row in rows:
        counts[row["shard"]] = counts.get(row["shard"], 0) + 1
    (out_dir / "shards.csv").write_text("shard,n_samples,bytes,sha256\n" + "".join(  # what the loader verifies
        f"{name},{n},{(out_dir / name).stat().st_size},{hashlib.sha256((out_dir / name).read_bytes()).hexdigest()}\n"
        for name, n in counts.items()))
    return keys


@pytest.fixture(scope="session")
def ct3m_shards(tmp_path_factory: pytest.TempPathFactory, real_data: Path) -> Path:
    """A directory of CT-3M shards (112 real axial CT slices in 3 shards)."""
    out = tmp_path_factory.mktemp("ct3m_shards")
    write_ct3m_shards(real_data / "totalsegmentator" / "example_ct.nii.gz", out)
    return out


def tiny_cfg(shards: Path, output_dir: Path, *overrides: str, stage_files: tuple[str, ...] = ()):
    """The shipped stage config (stage 1, or the stage of ``stage_files``) with only sizes shrunk, as
    :func:`shipped_cfg`; the dot-list ``overrides`` go last."""
    stage = 1
    for f in stage_files:
        if f.startswith("stage") and f[5:6].isdigit():
            stage = int(f[5])
    # stages 2-3 read the Gram teacher from a stage-1 run: the reference run's snapshot at iteration 8
    return shipped_cfg(stage, shards, output_dir, *overrides,
                       gram_teacher_iteration=REFERENCE_ITERATIONS if stage > 1 else None,
                       iterations=REFERENCE_ITERATIONS)


def shipped_cfg(stage: int, shards: Path, output_dir: Path, *overrides: str, gram_teacher_iteration: int | None = None,
                iterations: int = 4):
    """The shipped ``configs/pretrain/stage<stage>.yaml`` with only sizes shrunk (:func:`tiny_overrides`), every other
    default as shipped (FLOP counting, drop path, activation checkpointing in stage 3, ...), pointed at ``shards``."""
    from pretrain.train.config import load_config, tiny_overrides

    path = REPO_ROOT / "configs" / "pretrain" / f"stage{stage}.yaml"
    sizes = tiny_overrides(load_config(path), iterations=iterations, gram_teacher_iteration=gram_teacher_iteration)
    return load_config(path, [*sizes, f"data.shards={shards}", f"train.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="session")
def make_shipped_cfg():
    """:func:`shipped_cfg` as a fixture."""
    return shipped_cfg


@pytest.fixture(scope="session")
def make_tiny_cfg():
    """:func:`tiny_cfg` as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    return tiny_cfg


REFERENCE_ITERATIONS = 8
# compute.num_threads pinned: the resume tests compare losses bit for bit between the reference run, CLI runs and
# runs resumed in this process, and a float reduction split over another number of threads rounds differently
REFERENCE_OVERRIDES = ("checkpointing.period=3", "checkpointing.teacher_snapshots=[8]", "compute.num_threads=2")


@pytest.fixture(scope="session")
def tiny_reference_run(ct3m_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted tiny stage-1 run on the real-CT shards (8 iterations, checkpoints every 3, EMA-teacher
    snapshot at 8); returns its output directory. Shared by the resume, preemption and pipeline tests."""
    from pretrain.train.loop import train

    out = tmp_path_factory.mktemp("tiny_reference") / "stage1"
    result = train(tiny_cfg(ct3m_shards, out, *REFERENCE_OVERRIDES))
    assert result.finished
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def metrics_of():
    return read_metrics


@pytest.fixture(scope="session")
def reference_overrides():
    return REFERENCE_OVERRIDES


@pytest.fixture(scope="session")
def reference_cli():
    """``reference_cli(output_dir, shards, *options)``: ``python -m pretrain.train`` arguments giving the config of
    :func:`tiny_reference_run` (the shipped stage 1 with sizes shrunk); ``options`` (``--resume auto``) go before
    the ``key=value`` list, as argparse wants."""
    from pretrain.train.config import load_config, tiny_overrides

    path = REPO_ROOT / "configs" / "pretrain" / "stage1.yaml"
    sizes = tiny_overrides(load_config(path), iterations=REFERENCE_ITERATIONS)

    def argv(output_dir: Path, shards: Path, *options: str) -> list[str]:
        return ["--config", str(path), "--output-dir", str(output_dir), *options, f"data.shards={shards}", *sizes,
                *REFERENCE_OVERRIDES]
    return argv
