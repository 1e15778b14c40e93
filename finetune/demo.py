"""The end-to-end demo: ``python -m finetune.demo [--config configs/demo.yaml] [--out DIR]`` (``make demo``).

Runs the whole pipeline on the real CT sample embedded in the repository, as a user would, one project command
line after another (so every command the README shows is exercised):

    1. curate     python data_curation/build_ct3m.py --out OUT/ct3m --root folder=...   (CT-3M-style shards)
    2. pretrain   python -m pretrain.pipeline --run-dir OUT/pretrain ...                  (stages 1 -> 2 -> 3)
    3. dataset    the labelled finetune dataset (nnU-Net raw format; built from the sample for `demo_spleen`)
    4. finetune   python finetune/run.py --task ... --checkpoint OUT/pretrain/teacher_backbone.pth ...
    5. predict    python finetune/predict.py --model OUT/finetune --input scan.nii.gz --output OUT/predict
    6. pictures   python -m pretrain.visualize pca|similarity|curves, python -m finetune.plots bars|overlays

It lives in ``finetune`` because that is where the data flow ends; it imports nothing from the other packages and
drives them only through their command lines. Each tool is resumable, so re-running continues where it stopped.
Every step's full output goes to ``OUT/logs/<step>.log``; the console shows progress and a final summary saying
where every output is (also written to ``OUT/demo_summary.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
from omegaconf import DictConfig

from meddino_common.atomic import atomic_write_json, atomic_write_to_path
from meddino_common.config import ConfigError, load_config, shipped_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = shipped_config("demo.yaml")
DEMO_TASK = "demo_spleen"
TOTALSEG_SPLEEN_ID = 1  # TotalSegmentator "total" class map: 1 = spleen (class_map_total.json)


class StepFailed(RuntimeError):
    pass


def _repo_path(p: str | Path) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO_ROOT / path


def run_step(name: str, cmd: list[str], log_dir: Path, index: int, total: int) -> float:
    """Run one command from the repo root, streaming its output to the console (indented) and ``log_dir/name.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    shown = " ".join(str(c) if " " not in str(c) else repr(str(c)) for c in cmd)
    print(f"\n[{index}/{total}] {name}: {shown}", flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        log.write(f"$ {shown}\n")
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            # progress bars redraw with carriage returns: show only the last state of each line
            print("    " + line.rstrip("\n").split("\r")[-1], flush=True)
        code = proc.wait()
    elapsed = time.time() - t0
    if code != 0:
        raise StepFailed(f"step '{name}' failed with exit code {code}; full output in {log_path}")
    print(f"[{index}/{total}] {name} done in {elapsed:.0f}s", flush=True)
    return elapsed


# case id -> (image: NIfTI file or DICOM series folder, label NIfTI, spleen label value), relative to sample_ct/
DEMO_CASES = {
    "totalseg_example": ("totalsegmentator/example_ct.nii.gz",
                         "totalsegmentator/example_seg_fast_force_split.nii.gz", TOTALSEG_SPLEEN_ID),
    "msd_spleen2": ("msd_spleen/sub-spleen2_ct.nii.gz", "msd_spleen/sub-spleen2_ct_seg-manual.nii.gz", 1),
    "totalseg_dicom": ("totalsegmentator_dicom/example_ct_dicom", "totalsegmentator_dicom/example_seg_dicom.nii.gz",
                       TOTALSEG_SPLEEN_ID),
}
DEMO_SPLIT = {"train": ["totalseg_example", "totalseg_dicom"], "val": ["msd_spleen2"]}


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Atomic NIfTI write with both qform and sform set to ``affine`` (so every reader agrees on the geometry)."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write_to_path(path, lambda tmp: nib.save(img, tmp))


def _label_on_grid(label_img: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, label_path: Path) -> np.ndarray:
    """The label array reoriented onto an image grid that differs from it only by axis flips/permutations.

    Label maps are often stored in another orientation than the image (the TotalSegmentator DICOM example's labels
    are LAS, its series LPS): they are aligned by affine, never by raw array order.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(label_img.affine),
                                                nib.orientations.io_orientation(affine))
    data = nib.orientations.apply_orientation(np.asarray(label_img.dataobj), transform)
    moved = label_img.affine @ nib.orientations.inv_ornt_aff(transform, label_img.shape)
    if data.shape != tuple(shape) or not np.allclose(moved, affine, atol=1e-3):
        raise ValueError(f"{label_path}: label grid {label_img.shape} does not match its image {tuple(shape)} "
                         "after reorientation by affine")
    return data


def build_demo_dataset(sample_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """A three-case nnU-Net raw dataset (spleen) from the embedded sample, plus its ``splits_final.json``.

    Training cases: the TotalSegmentator example CT (whole abdomen, 3 mm, spleen ~33 HU) and the TotalSegmentator
    DICOM example (another patient and scanner, contrast-enhanced, spleen ~80 HU; JPEG 2000 DICOM read by
    ``meddino_datasets.readers.dicom``), both with TotalSegmentator-predicted labels. Validation case: the MSD spleen case with its
    MANUAL mask (contrast-enhanced, a tight crop around the spleen). With only the non-contrast case to learn from,
    the intensity normalisation fitted on it clips the validation spleen at its upper bound; the second training case
    covers the contrast phase. Three cases cannot make nnU-Net's five folds, so an explicit split file says which is
    which. NIfTI images are linked (copied if links are unavailable); the DICOM series is converted to NIfTI (int16
    HU, RAS affine); labels are written as uint8 on each image's own grid.
    """
    from meddino_datasets.readers.dicom import read_dicom_folder

    dataset = out_dir / "Dataset001_DemoSpleen"
    images, labels = dataset / "imagesTr", dataset / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case_id, (image_rel, label_rel, spleen_id) in DEMO_CASES.items():
        image_path, label_path = sample_dir / image_rel, sample_dir / label_rel
        for path in (image_path, label_path):
            if not path.exists():
                raise FileNotFoundError(f"demo sample file missing: {path} (the repository's data_curation/sample_ct)")
        target = images / f"{case_id}_0000.nii.gz"
        if not target.exists():  # a re-run keeps the converted image (decoding the DICOM series is the slow part)
            if image_path.is_dir():
                volume = read_dicom_folder(image_path)
                _save_nifti(np.rint(volume.data).astype(np.int16), volume.affine, target)
            else:
                try:
                    target.symlink_to(image_path.resolve())
                except OSError:
                    target.write_bytes(image_path.read_bytes())
        image = nib.load(str(target))  # header only: the grid every label is written on
        spleen = (_label_on_grid(nib.load(str(label_path)), image.shape, image.affine, label_path) == spleen_id)
        _save_nifti(spleen.astype(np.uint8), image.affine, labels / f"{case_id}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1},
            "numTraining": len(DEMO_CASES), "file_ending": ".nii.gz",
            "description": "MedDINOv3 demo: spleen, built from the repository's embedded real CT sample"}
    atomic_write_json(dataset / "dataset.json", meta)
    splits = out_dir / "splits_final.json"
    atomic_write_json(splits, [DEMO_SPLIT])
    return dataset, splits


def _summary_scores(summary_path: Path) -> dict:
    return json.loads(summary_path.read_text()) if summary_path.is_file() else {}


def print_summary(out: Path, outputs: dict, timings: dict, scores: dict) -> None:
    print("\n" + "=" * 78)
    print("MedDINOv3 demo finished" + f" in {sum(timings.values()):.0f}s " +
          "(" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")")
    print("=" * 78)
    width = max(len(k) for k in outputs)
    for key, value in outputs.items():
        print(f"  {key:<{width}}  {value}")
    if scores:
        print("\nValidation scores (finetune/validation/summary.json, the paper's convention: paper_mean / per_class):")
        print("  " + json.dumps(scores.get("per_class", scores), indent=None)[:400])
    print(f"\nEverything is under {out}; step logs in {out / 'logs'}.")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="demo config merged over configs/demo.yaml (strict: only its keys; any curation.roots)")
    parser.add_argument("--out", default=None, help="output folder (default: output_dir in the config)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides of the demo config, e.g. pretrain.overlay=null")
    args = parser.parse_args(argv)
    cfg: DictConfig = load_config([DEFAULT_CONFIG], [args.config] if args.config else [], args.overrides,
                                  open_blocks=["curation.roots"])
    out = _repo_path(args.out or cfg.output_dir).resolve()
    logs = out / "logs"
    py = sys.executable
    total = 6
    timings: dict[str, float] = {}
    t_start = time.time()

    # 1. curation
    ct3m = out / "ct3m"
    cmd = [py, "data_curation/build_ct3m.py", "--out", ct3m, "--workers", str(cfg.curation.workers)]
    for name, root in cfg.curation.roots.items():
        cmd += ["--root", f"{name}={_repo_path(root)}"]
    cmd += list(cfg.curation.overrides)
    timings["curate"] = run_step("curate", cmd, logs, 1, total)

    # 2. pretraining, stages 1 -> 2 -> 3
    pre = out / "pretrain"
    cmd = [py, "-m", "pretrain.pipeline", "--run-dir", pre]
    if cfg.pretrain.overlay:
        cmd += ["--overlay", str(cfg.pretrain.overlay)]
    if cfg.pretrain.init_from:
        cmd += ["--init-from", _repo_path(cfg.pretrain.init_from)]
    cmd += [f"data.shards={ct3m}", *[str(o) for o in cfg.pretrain.overrides]]
    timings["pretrain"] = run_step("pretrain", cmd, logs, 2, total)
    teacher = pre / "teacher_backbone.pth"

    # 3. the labelled dataset
    print(f"\n[3/{total}] dataset", flush=True)
    t0 = time.time()
    extra: list[str] = []
    if str(cfg.finetune.task) == DEMO_TASK:
        dataset, splits = build_demo_dataset(REPO_ROOT / "data_curation" / "sample_ct", out / "finetune_data")
        task = str(dataset)
        extra.append(f"splits_file={splits}")
        print(f"    nnU-Net raw dataset {dataset} (train: {', '.join(DEMO_SPLIT['train'])}; "
              f"validation: {', '.join(DEMO_SPLIT['val'])})", flush=True)
    else:
        task = str(cfg.finetune.task)
        print(f"    task {task}", flush=True)
    timings["dataset"] = time.time() - t0

    # 4. finetune + validation metrics
    ft = out / "finetune"
    cmd = [py, "finetune/run.py", "--task", task, "--head", str(cfg.finetune.head), "--checkpoint", teacher,
           "--output", ft]
    for c in cfg.finetune.configs:
        cmd += ["--config", _repo_path(c)]
    cmd += [*extra, *[str(o) for o in cfg.finetune.overrides]]
    timings["finetune"] = run_step("finetune", cmd, logs, 4, total)

    # 5. inference on a scan through the user-facing predict CLI
    pred_dir = out / "predict"
    cmd = [py, "finetune/predict.py", "--model", ft, "--input", _repo_path(cfg.predict.input), "--output", pred_dir,
           "--overwrite"]
    timings["predict"] = run_step("predict", cmd, logs, 5, total)

    # 6. pictures
    pics = out / "pictures"
    pics.mkdir(parents=True, exist_ok=True)
    image = _repo_path(cfg.pictures.image)
    stage_teachers = [pre / f"stage{i}" / "teacher_backbone.pth" for i in (1, 2, 3)]
    t0 = time.time()
    run_step("pictures-pca", [py, "-m", "pretrain.visualize", "pca", "--checkpoint", teacher, "--image", image,
                              "--resolutions", str(cfg.pictures.pca_resolutions), "--out", pics / "pca.png"],
             logs, 6, total)
    run_step("pictures-similarity", [py, "-m", "pretrain.visualize", "similarity", "--checkpoint", *stage_teachers,
                                     "--image", image, "--point", str(cfg.pictures.similarity_point),
                                     "--out", pics / "similarity_stages.png"], logs, 6, total)
    run_step("pictures-curves", [py, "-m", "pretrain.visualize", "curves", "--metrics",
                                 *[pre / f"stage{i}" / "metrics.jsonl" for i in (1, 2, 3)],
                                 "--labels", "stage1", "stage2", "stage3", "--out", pics / "pretrain_curves.png"],
             logs, 6, total)
    run_step("pictures-scores", [py, "-m", "finetune.plots", "bars", "--summary", ft / "validation" / "summary.json",
                                 "--out", pics / "finetune_scores.png"], logs, 6, total)
    if str(cfg.finetune.task) == DEMO_TASK:
        # each validation case: CT, its reference mask and the finetuned model's prediction, a few slices
        for val_case in DEMO_SPLIT["val"]:
            run_step(f"pictures-overlays-{val_case}", [
                py, "-m", "finetune.plots", "overlays", "--image", Path(task) / "imagesTr" / f"{val_case}_0000.nii.gz",
                "--gt", Path(task) / "labelsTr" / f"{val_case}.nii.gz", "--pred", ft / "validation" / f"{val_case}.nii.gz",
                "--labels", "1=spleen", "--out", pics / f"overlays_{val_case}.png"], logs, 6, total)
    timings["pictures"] = time.time() - t0

    scores = _summary_scores(ft / "validation" / "summary.json")
    outputs = {
        "CT-3M shards": f"{ct3m} (manifest.csv, stats.json)",
        "pretraining runs": f"{pre}/stage{{1,2,3}} (config.yaml, metrics.jsonl, checkpoints/)",
        "MedDINOv3 backbone": str(teacher),
        "finetune dataset": task,
        "finetune model": f"{ft / 'model_final.pt'}",
        "validation metrics": f"{ft / 'validation' / 'summary.json'}, {ft / 'per_case.csv'}",
        "validation masks": str(ft / "validation"),
        "predicted masks": str(pred_dir),
        "pictures": ", ".join(sorted(p.name for p in pics.glob("*.png"))) + f" in {pics}",
    }
    result = {"output_dir": str(out), "outputs": outputs, "timings_s": timings,
              "total_s": time.time() - t_start, "scores": scores}
    atomic_write_json(out / "demo_summary.json", json.loads(json.dumps(result, default=str)))
    print_summary(out, outputs, timings, scores)
    return result


if __name__ == "__main__":
    try:
        main()
    except (StepFailed, ConfigError) as err:
        print(f"\ndemo stopped: {err}", file=sys.stderr)
        sys.exit(1)
