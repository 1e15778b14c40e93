"""Multi-crop loader throughput per worker: our tensor pipeline vs a PIL/torchvision-style reference.

Both pipelines read the same real 512 x 512 CT slices from webdataset shards (written here from the
Siemens DICOM series in shared/data, or ``--shards`` for a CT-3M build), draw the same crop boxes, flips and
blur/intensity/noise decisions, and produce the same batch layout (2 x 224 global + 8 x 96 local crops,
3 channels, crop-major, iBOT masks). The reference does what the DINOv2/v3 augmentations do on a PIL image per
crop: HU window -> 8-bit RGB PIL image, crop + bicubic resize (PIL), flip, PIL Gaussian blur, ToTensor +
Normalize. One thread each (a DataLoader worker runs torch with one thread). Target: ours >= 2x faster.

    .venv/bin/python benchmarks/loader.py [--shards DIR] [--batches 6] [--batch-size 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageFilter

from meddino_common.config import load_config
from pretrain.data.augment import MultiCropParams, draw_photometric, sample_crop_box
from pretrain.data.collate import collate_ssl_batch
from pretrain.data.loader import SSLBatchSettings, build_batch
from pretrain.data.shards import decode_hu, expand_shards, slot_stream

REPO = Path(__file__).resolve().parents[1]
DICOM_SERIES = REPO.parent / "shared" / "data" / "real" / "totalsegmentator" / "example_ct_dicom"


def write_dicom_shards(series: Path, out: Path) -> Path:
    """npy CT-3M-style shards from a real DICOM series (HU = stored * slope + intercept)."""
    import pydicom

    files = sorted(p for p in series.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(f"no DICOM files in {series}")
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "ct3m-000000.tar")) as sink:
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            buf = io.BytesIO()
            np.save(buf, np.clip(hu, -32768, 32767).astype(np.int16))
            sink.write({"__key__": f"bench-{i:05d}", "npy": buf.getvalue(), "json": b"{}"})
    return out


def reference_sample(hu: np.ndarray, settings: SSLBatchSettings, sizes: tuple[int, int], rng) -> dict:
    """DINOv2/v3-style PIL pipeline on one slice, same draws as ``multi_crop``."""
    p: MultiCropParams = settings.crop_params
    t = settings.transform
    lo, hi = t.hu_clamp
    gray = ((np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo) * 255.0 + 0.5).astype(np.uint8)
    image = Image.fromarray(gray, mode="L").convert("RGB")  # what an ImageFolder/PIL loader hands the transforms
    # ToTensor + Normalize with the HU statistics expressed on the 8-bit scale
    mean = (t.mean - lo) / (hi - lo)
    std = t.std / (hi - lo)

    def crop(size: int, scale, blur_p: float) -> torch.Tensor:
        top, left, h, w = sample_crop_box(image.height, image.width, scale, p.aspect_ratio, rng)
        hflip, vflip = rng.random() < p.hflip_p, rng.random() < p.vflip_p
        t.sample_window(rng)
        draw = draw_photometric(p, blur_p, rng)
        c = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
        if hflip:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        if vflip:
            c = c.transpose(Image.FLIP_TOP_BOTTOM)
        if draw.blur_sigma is not None:
            c = c.filter(ImageFilter.GaussianBlur(radius=draw.blur_sigma))
        x = torch.from_numpy(np.asarray(c, dtype=np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
        x = (x - mean) / std  # Normalize
        if draw.scale is not None:
            x = x * draw.scale + draw.shift
        if draw.noise_std is not None:
            gen = torch.Generator().manual_seed(draw.noise_seed)
            x = x + draw.noise_std * torch.randn(x.shape, generator=gen)
        return x

    g, l = sizes
    return {
        "global_crops": [crop(g, p.global_scale, p.blur_global_p[i]) for i in range(p.n_global)],
        "local_crops": [crop(l, p.local_scale, p.blur_local_p) for _ in range(p.n_local)],
    }


def reference_batch(settings: SSLBatchSettings, slices: list[np.ndarray], iteration: int) -> dict:
    rng = np.random.default_rng(iteration)
    samples = [reference_sample(hu, settings, (224, 96), rng) for hu in slices]
    return collate_ssl_batch(
        samples, settings.transform, settings.patch_size, settings.mask_ratio_min_max,
        settings.mask_sample_probability, settings.masking, rng,
    )


def time_pipeline(make_batch, stream, settings: SSLBatchSettings, n_batches: int) -> float:
    """Samples per second, decode included."""
    start = time.perf_counter()
    for i in range(n_batches):
        raw = [next(stream)[1] for _ in range(settings.batch_size)]
        batch = make_batch([decode_hu(r) for r in raw], i)
        assert batch["collated_global_crops"].shape[1:] == (3, 224, 224)
        assert batch["collated_local_crops"].shape[1:] == (3, 96, 96)
    return n_batches * settings.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="CT-3M shard dir (default: shards from the DICOM sample)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_dicom_shards(DICOM_SERIES, Path(tmp) / "shards")
        cfg = load_config([REPO / "configs" / "pretrain" / "base.yaml"], overrides=[  # one rank, no accumulation
            f"data.shards={shards}", f"train.global_batch_size={args.batch_size}",
            f"data.max_batch_size_per_rank={args.batch_size}"])
        settings = SSLBatchSettings.from_config(cfg)
        paths = expand_shards(str(shards))
        first = decode_hu(next(slot_stream(paths, 0, 1, seed=0))[1])
        print(f"shards: {shards} ({len(paths)} file(s)); slice {first.shape} int16; batch {args.batch_size}; "
              f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size} "
              f"crops; torch threads {torch.get_num_threads()}")

        ours_fn = lambda slices, i: build_batch(settings, slices, 0, i)  # noqa: E731
        ref_fn = lambda slices, i: reference_batch(settings, slices, i)  # noqa: E731
        # warm-up, then alternate the two to share any machine-load drift
        time_pipeline(ours_fn, slot_stream(paths, 0, 1, seed=0), settings, 1)
        time_pipeline(ref_fn, slot_stream(paths, 0, 1, seed=0), settings, 1)
        ours, ref = [], []
        for r in range(args.repeats):
            ours.append(time_pipeline(ours_fn, slot_stream(paths, 0, 1, seed=r), settings, args.batches))
            ref.append(time_pipeline(ref_fn, slot_stream(paths, 0, 1, seed=r), settings, args.batches))
            print(f"  repeat {r}: ours {ours[-1]:.1f} samples/s, PIL reference {ref[-1]:.1f} samples/s")
        o, b = statistics.median(ours), statistics.median(ref)
        print(f"multi-crop samples/s per worker (median of {args.repeats}): ours {o:.1f}, PIL/torchvision-style "
              f"reference {b:.1f}; speed-up {o / b:.2f}x (target >= 2x) -> {'PASS' if o / b >= 2 else 'FAIL'}")


if __name__ == "__main__":
    main()
