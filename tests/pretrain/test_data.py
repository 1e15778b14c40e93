"""pretrain.data end to end on webdataset shards written from REAL CT (TotalSegmentator example CT slices)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from pretrain.data import build_ssl_loader
from pretrain.data.loader import CropSizeSampler, SSLBatchSettings, SSLBatchStream
from pretrain.data.shards import count_samples, decode_hu, expand_shards, iter_shard, slot_stream

BATCH_KEYS = {
    "collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight",
    "n_masked_patches", "upperbound",
}
SHARD_SIZES = (9, 9, 7)  # the last shard stores png, the others npy


def write_ct_shards(ct_path: Path, out_dir: Path, sizes=SHARD_SIZES, png_last: bool = True) -> list[str]:
    """CT-3M-format shards from the axial slices of a real CT volume; returns all keys in write order."""
    volume = nib.load(str(ct_path))
    hu = np.asanyarray(volume.dataobj).astype(np.int16)  # [X, Y, Z]
    zooms = [float(z) for z in volume.header.get_zooms()]
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, z = [], 0
    for s, n in enumerate(sizes):
        use_png = png_last and s == len(sizes) - 1
        with wds.TarWriter(str(out_dir / f"ct3m-{s:06d}.tar")) as sink:
            for _ in range(n):
                key = f"totalseg-s0011-{z:05d}"
                slice_hu = np.ascontiguousarray(hu[:, :, 2 * z + 10])
                sample = {"__key__": key}
                if use_png:
                    buf = io.BytesIO()
                    Image.fromarray((slice_hu.astype(np.int32) + 32768).astype(np.uint16)).save(buf, format="PNG")
                    sample["png"] = buf.getvalue()
                else:
                    buf = io.BytesIO()
                    np.save(buf, slice_hu)
                    sample["npy"] = buf.getvalue()
                meta = {"source": "totalseg", "case": "s0011", "slice_index": 2 * z + 10,
                        "spacing_mm": zooms[:2], "slice_spacing_mm": zooms[2], "original_shape": list(slice_hu.shape)}
                sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
                keys.append(key)
                z += 1
    return keys


@pytest.fixture(scope="module")
def ct_shards(tmp_path_factory: pytest.TempPathFactory, real_data: Path) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ct3m")
    keys = write_ct_shards(real_data / "totalsegmentator" / "example_ct.nii.gz", out)
    return out, keys


def tiny_config(repo_root: Path, shards, **overrides) -> "OmegaConf":
    cfg = OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml")
    small = {
        "data": {"shards": str(shards), "max_batch_size_per_rank": 4, "num_workers": 0, "shuffle_block": 5,
                 "interleave_shards": 2},
        "train": {"global_batch_size": 4},  # 4 images per rank in one process; the plan splits it over ranks
        "crops": {"global_crops_size": 64, "local_crops_size": 32, "local_crops_number": 3},
    }
    cfg = OmegaConf.merge(cfg, small, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    return cfg


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def test_batch_keys_shapes_and_values(ct_shards, repo_root: Path) -> None:
    shards, _ = ct_shards
    cfg = tiny_config(repo_root, shards)
    batch = next(build_ssl_loader(cfg))
    assert set(batch) == BATCH_KEYS
    b, n_tokens = 4, (64 // 16) ** 2
    assert batch["collated_global_crops"].shape == (2 * b, 3, 64, 64)
    assert batch["collated_local_crops"].shape == (3 * b, 3, 32, 32)
    assert batch["collated_global_crops"].dtype == torch.float32
    assert batch["collated_masks"].shape == (2 * b, n_tokens) and batch["collated_masks"].dtype == torch.bool
    m = int(batch["collated_masks"].sum())
    assert batch["mask_indices_list"].shape == (m,) and batch["masks_weight"].shape == (m,)
    assert batch["n_masked_patches"].tolist() == [m]
    assert (batch["collated_masks"].sum(1) > 0).sum() == b  # half of the 2B global crops are masked
    for key in ("collated_global_crops", "collated_local_crops"):
        x = batch[key]
        assert torch.isfinite(x).all()
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # one HU channel repeated
        assert x.std() > 0.1  # real anatomy, not a constant
    # default transform: clamp [-1000, 1000] then z-score (photometric aug may stretch it by ~10% + noise)
    lo, hi = (-1000 - 65.1084) / 178.0166, (1000 - 65.1084) / 178.0166
    x = batch["collated_global_crops"]
    assert x.min() > lo * 1.2 - 1.0 and x.max() < hi * 1.2 + 1.0


def test_png_and_npy_samples_decode_to_the_same_hu(tmp_path: Path, real_data: Path) -> None:
    ct = real_data / "totalsegmentator" / "example_ct.nii.gz"
    write_ct_shards(ct, tmp_path / "npy", sizes=(3,), png_last=False)
    write_ct_shards(ct, tmp_path / "png", sizes=(3,), png_last=True)
    npy = [decode_hu(s) for s in iter_shard(tmp_path / "npy" / "ct3m-000000.tar")]
    png = [decode_hu(s) for s in iter_shard(tmp_path / "png" / "ct3m-000000.tar")]
    volume = np.asanyarray(nib.load(str(ct)).dataobj)
    for i, (a, b) in enumerate(zip(npy, png)):
        assert a.dtype == np.int16 and np.array_equal(a, b)
        assert np.array_equal(a, volume[:, :, 2 * i + 10])
        assert a.min() < -900 and a.max() > 200  # air and dense tissue: real HU


def test_shard_reader_matches_webdataset(ct_shards) -> None:
    shards, keys = ct_shards
    paths = expand_shards(shards)
    ours = [s.key for p in paths for s in iter_shard(p)]
    theirs = [s["__key__"] for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]
    assert ours == theirs == keys
    assert [count_samples(p) for p in paths] == list(SHARD_SIZES)
    assert expand_shards(str(shards / "ct3m-{000000..000002}.tar")) == paths
    assert expand_shards([str(paths[2]), str(paths[0])]) == [paths[2], paths[0]]


@pytest.mark.parametrize("world,workers", [(2, 2), (1, 3), (3, 1)])
def test_no_duplicates_within_an_epoch_across_ranks_and_workers(ct_shards, world: int, workers: int) -> None:
    shards, keys = ct_shards
    paths = expand_shards(shards)
    n_slots = world * workers
    seen: list[str] = []
    for slot in range(n_slots):
        for epoch, sample in slot_stream(paths, slot, n_slots, seed=3, interleave=2, shuffle_block=4):
            if epoch > 0:
                break
            seen.append(sample.key)
    assert len(seen) == len(set(seen)) == len(keys)  # every sample exactly once per epoch
    assert set(seen) == set(keys)


def test_epochs_reshuffle(ct_shards) -> None:
    paths = expand_shards(ct_shards[0])
    stream = slot_stream(paths, 0, 1, seed=0, interleave=3, shuffle_block=4)
    first = [next(stream)[1].key for _ in range(len(ct_shards[1]))]
    second = [next(stream)[1].key for _ in range(len(ct_shards[1]))]
    assert sorted(first) == sorted(second) == sorted(ct_shards[1])
    assert first != second
    assert first != ct_shards[1]  # shuffled, not in file order


@pytest.mark.parametrize("start", [1, 4, 7, 13, 25, 26, 40])
def test_slot_stream_resume_equals_uninterrupted(ct_shards, start: int) -> None:
    paths = expand_shards(ct_shards[0])
    full = slot_stream(paths, 1, 2, seed=5, interleave=2, shuffle_block=3)
    reference = [(e, s.key) for e, s in (next(full) for _ in range(start + 12))][start:]
    resumed = slot_stream(paths, 1, 2, seed=5, interleave=2, shuffle_block=3, start=start)
    assert [(e, s.key) for e, s in (next(resumed) for _ in range(12))] == reference


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_is_bit_identical(ct_shards, repo_root: Path, num_workers: int) -> None:
    cfg = tiny_config(repo_root, ct_shards[0], **{"data.num_workers": num_workers})
    uninterrupted = take(build_ssl_loader(cfg, rank=1, world_size=2), 7)
    for start in (3, 4):
        resumed = take(build_ssl_loader(cfg, rank=1, world_size=2, start_iter=start), 7 - start)
        assert_batches_equal(resumed, uninterrupted[start:])
    other_rank = take(build_ssl_loader(cfg, rank=0, world_size=2), 2)
    assert not torch.equal(other_rank[0]["collated_global_crops"], uninterrupted[0]["collated_global_crops"])


def test_workers_do_not_change_samples_order_contract(ct_shards, repo_root: Path) -> None:
    """Each batch is a pure function of (seed, rank, iteration, slices): rebuilding it gives the same tensors."""
    cfg = tiny_config(repo_root, ct_shards[0], **{"data.num_workers": 2})
    a = take(build_ssl_loader(cfg), 4)
    b = take(build_ssl_loader(cfg), 4)
    assert_batches_equal(a, b)
    assert not torch.equal(a[0]["collated_global_crops"], a[1]["collated_global_crops"])


def test_gram_teacher_crops_are_the_same_crops_at_higher_resolution(ct_shards, repo_root: Path) -> None:
    cfg = tiny_config(repo_root, ct_shards[0], **{
        "crops.gram_teacher_crops_size": 128, "crops.gram_teacher_no_distortions": True,
    })
    batch = next(build_ssl_loader(cfg))
    assert set(batch) == BATCH_KEYS | {"collated_gram_teacher_crops"}
    gram = batch["collated_gram_teacher_crops"]
    assert gram.shape == (8, 3, 128, 128)
    down = torch.nn.functional.interpolate(gram, size=(64, 64), mode="bicubic", antialias=True, align_corners=False)
    student = batch["collated_global_crops"]
    for i in range(8):  # same box and flip: high correlation with its own student crop, not with the others
        own = torch.corrcoef(torch.stack([down[i].flatten(), student[i].flatten()]))[0, 1]
        assert own > 0.9, (i, own)


def test_mixed_resolution_sequence(ct_shards, repo_root: Path) -> None:
    cfg = tiny_config(repo_root, ct_shards[0], **{"crops.local_crops_number": 1})
    cfg.crops.global_crops_size = [64, 96]
    cfg.crops.global_crops_size_probs = [0.5, 0.5]
    cfg.crops.local_crops_size = [32, 48]
    cfg.crops.gram_teacher_crops_size = [96, 128]
    cfg.crops.paired_crop_sizes = True
    sizes = [(b["collated_global_crops"].shape[-1], b["collated_local_crops"].shape[-1],
              b["collated_gram_teacher_crops"].shape[-1], b["collated_masks"].shape[1])
             for b in take(build_ssl_loader(cfg, rank=0, world_size=2), 8)]
    assert set(sizes) == {(64, 32, 96, 16), (96, 48, 128, 36)}  # both pairs occur, each batch consistent
    other_rank = [b["collated_global_crops"].shape[-1] for b in take(build_ssl_loader(cfg, rank=1, world_size=2), 8)]
    assert other_rank == [s[0] for s in sizes]  # all ranks draw the same resolution per step
    # the probabilities are honoured
    cfg.crops.global_crops_size = [64, 96, 128]
    cfg.crops.global_crops_size_probs = [0.6, 0.3, 0.1]
    cfg.crops.local_crops_size = 32
    cfg.crops.gram_teacher_crops_size = None
    cfg.crops.paired_crop_sizes = False
    sampler = CropSizeSampler.from_config(cfg.crops)
    rng = np.random.default_rng(0)
    draws = np.array([sampler(rng)[0] for _ in range(4000)])
    for size, p in zip((64, 96, 128), (0.6, 0.3, 0.1)):
        assert abs((draws == size).mean() - p) < 0.03


def test_corrupt_shard_error_names_the_file(tmp_path: Path, repo_root: Path) -> None:
    bad = tmp_path / "ct3m-000000.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="ct3m-000000.tar"):
        list(iter_shard(bad))
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_shards(tmp_path / "missing-{0..1}.tar")
    cfg = tiny_config(repo_root, tmp_path)
    cfg.data.shards = None
    with pytest.raises(ValueError, match="data.shards"):
        build_ssl_loader(cfg)


def test_sample_without_image_field_is_a_clear_error(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "ct3m-000000.tar")) as sink:
        sink.write({"__key__": "x-0", "json": b"{}"})
    sample = next(iter_shard(tmp_path / "ct3m-000000.tar"))
    with pytest.raises(ValueError, match="no 'npy' or 'png'"):
        decode_hu(sample)


def test_window_set_transform_through_the_loader(ct_shards, repo_root: Path) -> None:
    cfg = tiny_config(repo_root, ct_shards[0], **{"data.transform.mode": "window_set"})
    batch = next(build_ssl_loader(cfg))
    x = batch["collated_global_crops"]
    assert x.shape == (8, 3, 64, 64) and torch.isfinite(x).all()
    assert not torch.equal(x[:, 0], x[:, 1]) and not torch.equal(x[:, 1], x[:, 2])  # three HU windows
    rw = tiny_config(repo_root, ct_shards[0], **{"data.transform.mode": "random_window"})
    assert next(build_ssl_loader(rw))["collated_global_crops"].shape == (8, 3, 64, 64)


@pytest.fixture(scope="module")
def curated_shards(tmp_path_factory: pytest.TempPathFactory, sample_ct: Path, repo_root: Path) -> Path:
    """The curation engineer's real builder on the embedded CT sample (TotalSegmentator + MSD spleen)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("ct3m_built")
    cmd = [sys.executable, str(repo_root / "data_curation" / "build_ct3m.py"), "--out", str(out),
           "--root", f"folder={sample_ct}", "--sources", "folder", "--workers", "1"]
    done = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_loader_on_build_ct3m_output(curated_shards: Path, repo_root: Path) -> None:
    import csv

    with open(curated_shards / "manifest.csv", newline="") as f:
        manifest = [row["key"] for row in csv.DictReader(f)]
    paths = expand_shards(curated_shards)
    assert sum(count_samples(p) for p in paths) == len(manifest) > 100  # counts come from manifest.csv
    seen = []
    for slot in range(4):  # 2 ranks x 2 workers, one epoch
        for epoch, sample in slot_stream(paths, slot, 4, seed=0, interleave=4, shuffle_block=32):
            if epoch > 0:
                break
            seen.append(sample.key)
    assert sorted(seen) == sorted(manifest)
    cfg = tiny_config(repo_root, curated_shards, **{"data.num_workers": 2, "train.global_batch_size": 8})
    batches = take(build_ssl_loader(cfg, rank=1, world_size=2), 3)
    for batch in batches:
        assert set(batch) == BATCH_KEYS
        assert batch["collated_global_crops"].shape == (8, 3, 64, 64)
        assert torch.isfinite(batch["collated_global_crops"]).all()
    resumed = take(build_ssl_loader(cfg, rank=1, world_size=2, start_iter=2), 1)
    assert_batches_equal(resumed, batches[2:])


def test_crops_are_stacked_crop_major() -> None:
    """Row c * B + b of a collated tensor is crop c of image b (DINOv2/v3 layout the trainer unflattens)."""
    from pretrain.data.collate import stack_crop_major
    from pretrain.data.transforms import HUTransform

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "base.yaml")
    transform = HUTransform.from_config(cfg.data.transform)
    n_images, n_crops = 3, 4
    per_sample = [[torch.full((1, 2, 2), 10.0 * b + c) for c in range(n_crops)] for b in range(n_images)]
    stacked = stack_crop_major(per_sample, transform)
    assert stacked.shape == (n_crops * n_images, 3, 2, 2)
    for c in range(n_crops):
        for b in range(n_images):
            assert torch.all(stacked[c * n_images + b] == 10.0 * b + c)
    assert torch.equal(stacked.unflatten(0, (n_crops, n_images))[2, 1], stacked[2 * n_images + 1])
