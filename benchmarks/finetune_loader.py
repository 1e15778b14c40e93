"""Finetune batch building per worker at the paper's 896 x 896: our sampler + augmentation vs nnU-Net's own 2-D
pipeline (its data loader and batchgeneratorsv2 transforms), on the same preprocessed cases.

    .venv/bin/python benchmarks/finetune_loader.py [--size 896] [--batch 12] [--batches 8] [--rounds 3]
        [--gpu-step-s 0.25]

Cases: the two real CTs shipped in ``data_curation/sample_ct`` (TotalSegmentator example, 117 labels; MSD spleen)
planned and preprocessed by `finetune.preprocess` so their median slice becomes ``--size`` px, exactly as a
finetune run does. Ours: `finetune.data.PatchSampler` with the shipped ``configs/finetune/base.yaml`` (the paper
recipe: nnU-Net's 2-D transforms, low-resolution simulation off). nnU-Net: the same arrays written in its numpy
dataset layout (``<id>.npy``, ``<id>_seg.npy``, ``<id>.pkl`` with the class locations; memory-mapped as ours, but
copy-on-write, see ``CopyOnWriteNumpyDataset``), its ``nnUNetDataLoader``
(initial patch from ``get_patch_size``, foreground oversampling 0.33) and ``nnUNetTrainer.get_training_transforms``
for a 2-D configuration (rotation +-180 deg, mirroring (0, 1), no deep supervision). Both run in this process
with one torch thread, as one data-loading worker does; rounds interleave the two.

Printed: samples/s per worker for each, ours/theirs (target >= 1.0), and how many workers keep one GPU fed at
``--gpu-step-s`` seconds per optimizer step of ``--batch`` samples. The default 0.25 s is an estimate, not a
measurement: ViT-B/16 at 896 px is ~0.65 TFLOP forward per image (3,136 tokens: 16x the 224 px linear layers plus
quadratic attention), x3 for forward + backward, x12 samples = ~24 TFLOP per step, i.e. ~0.2 s at 125 TFLOP/s
(an A100 at 40 % of its bf16 peak), plus the decoder. Pass a measured step time instead when you have one.
"""
from __future__ import annotations

import argparse
import math
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from finetune.config import load_config
from finetune.data import PatchSampler, load_preprocessed
from finetune.preprocess import plan_from_training_cases, preprocess_dataset
from meddino_datasets.case import Case

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "data_curation" / "sample_ct"
CASES = [Case("totalseg", SAMPLE_CT / "totalsegmentator" / "example_ct.nii.gz",
              SAMPLE_CT / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"),
         Case("spleen", SAMPLE_CT / "msd_spleen" / "sub-spleen2_ct.nii.gz",
              SAMPLE_CT / "msd_spleen" / "sub-spleen2_ct_seg-manual.nii.gz")]
N_LABELS = 118                       # TotalSegmentator's 117 classes + background (spleen is label 1 in both)


def preprocess(size: int, work: Path):
    """The finetune config (shipped defaults at ``size`` px), its plans and the two cases preprocessed as a finetune
    run does."""
    (work / "Dataset1_Bench").mkdir(parents=True, exist_ok=True)
    cfg = load_config(str(work / "Dataset1_Bench"), "primus", [], [
        f"preprocess.target_slice_px={size}", f"data.patch_size=[{size},{size}]", "preprocess.foreground_samples_total=1e6"])
    labels = ["background", *[f"class_{i}" for i in range(1, N_LABELS)]]
    plans = plan_from_training_cases(CASES, labels, cfg)
    dirs = preprocess_dataset(CASES, plans, work / "cache")
    return cfg, plans, [load_preprocessed(d) for d in dirs.values()]


def write_nnunet_dataset(cases, folder: Path) -> list[str]:
    """The same arrays in nnU-Net's numpy dataset layout (data ``[1, Z, Y, X]``, seg ``[1, Z, Y, X]``, properties with
    ``class_locations`` as ``[n, 4]`` (channel, z, y, x) per class, as its preprocessor stores them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        np.save(folder / f"{case.case_id}.npy", np.asarray(case.image)[None].astype(np.float32))
        np.save(folder / f"{case.case_id}_seg.npy", np.asarray(case.label)[None].astype(np.int16))
        locations = {c: np.concatenate([np.zeros((len(v), 1), np.int64), v.astype(np.int64)], 1)
                     for c, v in case.locations.items()}
        with open(folder / f"{case.case_id}.pkl", "wb") as f:
            pickle.dump({"class_locations": locations}, f)
    return [c.case_id for c in cases]


def nnunet_loader(folder: Path, ids: list[str], size: int, batch: int):
    """nnU-Net's own 2-D training loader + transforms (nnUNetTrainer defaults for a square 2-D patch)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    patch = (size, size)
    rotation = (-math.pi, math.pi)                         # 2-D, square patch: +-180 deg
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    transforms = nnUNetTrainer.get_training_transforms(patch, rotation, None, (0, 1), False)
    labels = LabelManager({"background": 0, **{f"class_{i}": i for i in range(1, N_LABELS)}}, None)
    class CopyOnWriteNumpyDataset(nnUNetDatasetNumpy):
        """nnU-Net's numpy dataset, memory-mapped copy-on-write: its loader hands out views of the mapped arrays when
        a crop needs no padding and its in-place intensity transforms then write to them (read-only: SIGSEGV)."""

        def load_case(self, identifier):
            data = np.load(folder / f"{identifier}.npy", mmap_mode="c")
            seg = np.load(folder / f"{identifier}_seg.npy", mmap_mode="c")
            with open(folder / f"{identifier}.pkl", "rb") as f:
                return data, seg, None, pickle.load(f)

    dataset = CopyOnWriteNumpyDataset(str(folder), ids)
    return nnUNetDataLoader(dataset, batch, initial, patch, labels, oversample_foreground_percent=0.33,
                            transforms=transforms), tuple(int(s) for s in initial)


def time_batches(make_batch, n: int) -> float:
    """Samples per second of ``n`` consecutive batches (after one warm-up batch)."""
    make_batch(10 ** 6)
    t0 = time.perf_counter()
    samples = sum(make_batch(i) for i in range(n))
    return samples / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=896)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per pipeline and round (each draws its "
                        "own rotated/scaled samples: few batches make a noisy ratio)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu-step-s", type=float, default=0.25, help="seconds per GPU optimizer step (see docstring)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg, plans, cases = preprocess(args.size, work)
        print(f"{len(cases)} cases at {args.size} px: " + ", ".join(f"{c.case_id} {tuple(c.image.shape)}" for c in cases))
        ours = PatchSampler(cases, cfg, "slice2d", plans.patch_size, seed=0)
        ours.batch_size = args.batch
        loader, initial = nnunet_loader(work / "nnunet", write_nnunet_dataset(cases, work / "nnunet"), args.size, args.batch)
        np.random.seed(0)
        print(f"nnU-Net initial patch {initial} -> final {args.size}x{args.size}; batch {args.batch}; 1 thread each")

        def ours_batch(i: int) -> int:
            return ours.batch(i)["image"].shape[0]

        def theirs_batch(_: int) -> int:
            return loader.generate_train_batch()["data"].shape[0]

        rates: dict[str, list[float]] = {"ours": [], "nnU-Net": []}
        for r in range(args.rounds):
            rates["ours"].append(time_batches(ours_batch, args.batches))
            rates["nnU-Net"].append(time_batches(theirs_batch, args.batches))
            print(f"round {r}: ours {rates['ours'][-1]:.2f} samples/s, nnU-Net {rates['nnU-Net'][-1]:.2f} samples/s "
                  f"({rates['ours'][-1] / rates['nnU-Net'][-1]:.2f}x)")
    ours_rate, their_rate = (statistics.median(rates[k]) for k in ("ours", "nnU-Net"))
    needed = args.batch / args.gpu_step_s
    print(f"\nper worker: ours {ours_rate:.2f} samples/s, nnU-Net {their_rate:.2f} samples/s -> ours/theirs "
          f"{ours_rate / their_rate:.2f}x (target >= 1.0)")
    print(f"one GPU at {args.gpu_step_s:.2f} s/step x {args.batch} samples needs {needed:.0f} samples/s: "
          f"{math.ceil(needed / ours_rate)} workers of ours, {math.ceil(needed / their_rate)} of nnU-Net's")
    return {"ours": ours_rate, "nnunet": their_rate, "ratio": ours_rate / their_rate,
            "workers": math.ceil(needed / ours_rate)}


if __name__ == "__main__":
    main()
