"""SSL training-step cost vs the backbone's bare forward + backward on the same crops.

Batches are real multi-crop batches (``pretrain.data``) from CT-3M-style shards written here from the embedded
TotalSegmentator CT sample. Measured in the same process, median over repeats:

- ``bare``: student backbone forward (global crops with iBOT masks + local crops, one pass) + backward of a
  scalar of its outputs: the irreducible cost of training the ViT on these crops;
- ``teacher``: the EMA teacher's forward on the global crops (part of the method, not overhead);
- ``ssl``: one full trainer iteration: teacher + student + DINO/iBOT heads, Sinkhorn-Knopp, DINO/iBOT/KoLeo
  losses, backward, gradient clipping, AdamW step, teacher EMA.

Overhead = (ssl - teacher - bare) / bare: what heads, losses, masking, optimiser and EMA add. Target <= 30%.

    .venv/bin/python benchmarks/train_step.py [--arch vitb16] [--batch-size 4] [--global-size 224]
        [--local-size 96] [--local-crops 8] [--prototypes 65536] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import webdataset as wds

from pretrain.data import build_ssl_loader
from pretrain.train.config import default_config_dir, load_config
from pretrain.train.meta_arch import SSLMetaArch
from pretrain.train.optim import apply_schedules, build_optimizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CT = REPO / "data_curation" / "sample_ct" / "totalsegmentator" / "example_ct.nii.gz"


def write_shards(ct_path: Path, out: Path) -> Path:
    vol = np.asarray(nib.as_closest_canonical(nib.load(str(ct_path))).dataobj).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "ct3m-000000.tar")) as sink:
        for z in range(vol.shape[2]):
            buf = io.BytesIO()
            np.save(buf, np.rot90(vol[:, :, z]).round().astype(np.int16))
            sink.write({"__key__": f"bench-{z:05d}", "npy": buf.getvalue(), "json": b"{}"})
    return out


def timed_interleaved(fns, repeats: int) -> list[float]:
    """Median time of each function, measured round-robin so that load changes hit all of them alike."""
    for fn in fns:  # warm-up
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vitb16")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(SAMPLE_CT, Path(tmp) / "shards")
        overrides = [
            f"data.shards={shards}", "data.num_workers=0", f"train.global_batch_size={args.batch_size}",
            f"data.max_batch_size_per_rank={args.batch_size}",
            f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
            f"crops.local_crops_number={args.local_crops}", f"student.arch={args.arch}",
            "student.drop_path_rate=0.0",
            f"dino.head_n_prototypes={args.prototypes}", f"ibot.head_n_prototypes={args.prototypes}",
        ]
        if args.depth:
            overrides.append(f"student.overrides={{depth: {args.depth}}}")
        cfg = load_config(default_config_dir() / "stage1.yaml", overrides)
        batch = next(build_ssl_loader(cfg, 0, 1, 0))

    meta = SSLMetaArch.from_config(cfg)
    meta.train()
    optimizer = build_optimizer(meta.student, meta.n_blocks, cfg.optim)
    apply_schedules(optimizer, lr=1e-6, wd=0.04, last_layer_lr=1e-6)
    backbone = meta.student["backbone"]
    g, l, masks = batch["collated_global_crops"], batch["collated_local_crops"], batch["collated_masks"]

    def bare() -> None:
        backbone.zero_grad(set_to_none=True)
        outs = backbone.forward_features_list([g, l], [masks, None])
        sum(o["x_norm_clstoken"].sum() + o["x_norm_patchtokens"].sum() for o in outs).backward()

    def teacher() -> None:
        with torch.no_grad():
            meta.teacher["backbone"].forward_features(g)

    def ssl() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta.forward_backward(batch, teacher_temp=0.07)
        torch.nn.utils.clip_grad_norm_(meta.student.parameters(), 3.0)
        optimizer.step()
        meta.update_teacher(0.999)

    t_bare, t_teacher, t_ssl = timed_interleaved([bare, teacher, ssl], args.repeats)
    overhead = (t_ssl - t_teacher - t_bare) / t_bare
    print(f"arch {args.arch} depth {backbone.n_blocks} | batch {args.batch_size}: 2 x {args.global_size}px + "
          f"{args.local_crops} x {args.local_size}px | K {args.prototypes} | {args.threads} threads")
    print(f"bare backbone fwd+bwd : {t_bare * 1e3:9.1f} ms")
    print(f"teacher forward       : {t_teacher * 1e3:9.1f} ms")
    print(f"full SSL iteration    : {t_ssl * 1e3:9.1f} ms  (ratio to bare {t_ssl / t_bare:.2f}x)")
    print(f"overhead (heads, losses, masking, AdamW, EMA) = {100 * overhead:.1f}% of bare "
          f"(target <= 30%): {'OK' if overhead <= 0.30 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
