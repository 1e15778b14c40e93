"""Finetune one fold end to end: split -> plan + preprocess (cached) -> train -> predict the validation cases ->
metrics (``validation/summary.json``, ``per_case.csv``, a Table-2-style printout).

    meddino-finetune --task amos22|btcv|kits23|lits|path/to/DatasetXXX_Name|DatasetXXX_Name|XXX
        [--head primus|mvr|med3d|window3d] [--checkpoint backbone.pth] [--fold 0|...|4|all] [--output DIR]
        [--config extra.yaml ...] [key=value ...]

(``python finetune/run.py`` and ``python -m finetune.run`` are the same command.) ``DatasetXXX_Name`` and ``XXX``
are looked up in ``$nnUNet_raw`` as nnU-Net's own commands do; a ``splits_final.json`` in
``$nnUNet_preprocessed/DatasetXXX_Name/`` or in the raw dataset folder is used (``splits_file=`` names another).

``--checkpoint`` sets ``model.checkpoint`` and ``model.init=pretrained`` (MedDINOv3 release, official DINOv3 .pth,
or our ``teacher_backbone.pth``); without it the config decides (``model.init=random`` for the paper's random-init
row). ``--weights dinov3`` picks the 1e-4 encoder lr for official DINOv3 weights (3e-5 for MedDINOv3).
Output folder (nnU-Net's fold layout): ``config.yaml`` (resolved), ``plans.json``, ``splits_final.json`` (when the
default split is used), ``training_log.txt``, ``progress.png``, ``metrics.jsonl``, ``checkpoints/latest.pt``,
``checkpoint_best.pth``, ``checkpoint_final.pth``, ``model_final.pt`` (plain weights), ``tensorboard/``
(``train.tensorboard=true``), ``validation/<case>.nii.gz``, ``validation/summary.json``, ``per_case.csv``.
Re-running the same command resumes training from the last checkpoint (``train.resume=auto``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from finetune.config import load_config
from finetune.heads import available_heads, get_recipe
from finetune.infer import predict_case
from finetune.metrics import (build_summary, evaluate_case, evaluation_classes, format_table, write_per_case_csv,
                              write_summary_json)
from finetune.preprocess import (Plans, load_plans, plan_from_training_cases, preprocess_dataset, read_volume,
                                 save_label_nifti, save_plans)
from meddino_datasets.splits import fold_split, nnunet_kfold_splits, save_splits_file
from finetune.tasks import task_cases, task_eval_regions, task_labels, task_splits_file


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meddino-finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True,
                        help="a registered task (amos22, btcv, kits23, lits), an nnU-Net raw DatasetXXX_Name folder, "
                             "or DatasetXXX_Name / XXX found in $nnUNet_raw")
    parser.add_argument("--head", default="primus", help=f"segmentation head: one of {', '.join(available_heads())}")
    parser.add_argument("--checkpoint", default=None, help="backbone weights (sets model.init=pretrained)")
    parser.add_argument("--weights", choices=("meddinov3", "dinov3"), default=None,
                        help="origin of --checkpoint, which sets the encoder lr (3e-5 MedDINOv3, 1e-4 DINOv3)")
    parser.add_argument("--fold", default=None, help="0..4 or 'all' (default: config, 0)")
    parser.add_argument("--output", default=None, help="output folder (default: config output_dir)")
    parser.add_argument("--config", action="append", default=[],
                        help="extra YAML merged last, repeatable (e.g. configs/finetune/tiny.yaml or tiny.yaml)")
    parser.add_argument("--skip-training", action="store_true", help="predict + evaluate with the existing model_final.pt")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (OmegaConf dot-list), e.g. train.epochs=10")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DictConfig:
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides += [f"model.checkpoint={Path(args.checkpoint).resolve()}", "model.init=pretrained"]
    if args.weights:
        overrides.append(f"model.weights={args.weights}")
    if args.fold is not None:
        overrides.append(f"fold={args.fold}")
    if args.output:
        overrides.append(f"output_dir={Path(args.output).resolve()}")
    return load_config(args.task, args.head, args.config, overrides)


def fold_case_ids(cfg, case_ids: list[str], write: bool = True) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``cfg.fold``, from the ``splits_final.json`` nnU-Net would use, else its default split.

    Says which split it took. ``write`` (rank 0) records a found file in ``cfg.splits_file`` (so config.yaml names
    it) or writes the default 5-fold split to ``<output>/splits_final.json``; fold ``all`` reads and writes none
    (as nnU-Net), so it also works with fewer cases than folds.
    """
    output_dir = Path(cfg.output_dir)
    every_case = str(cfg.fold) == "all"
    splits_file, origin = (None, "") if every_case else task_splits_file(cfg)
    train_ids, val_ids = fold_split(case_ids, cfg.fold, splits_file)
    if not write:
        return train_ids, val_ids
    if splits_file is not None:
        cfg.splits_file = str(splits_file)
        print(f"split: {splits_file} (from {origin}), fold {cfg.fold}", flush=True)
    elif every_case:
        print("split: fold all, every case is trained and validated on", flush=True)
    else:
        print(f"split: nnU-Net's default 5-fold split, written to {output_dir / 'splits_final.json'} "
              f"(splits_final.json: {origin})", flush=True)
        save_splits_file(nnunet_kfold_splits(case_ids), output_dir / "splits_final.json")
    return train_ids, val_ids


def prepare_fold(cfg, rank: int = 0):
    """Cases, split, plans and the preprocessed cache of one fold. Returns (train cases, val cases, plans, dirs).

    The plans (``plans.json``) carry the class names (``task.labels`` or ``dataset.json``) and the patch size
    (``data.patch_size``); a folder whose plans were made for other ones is refused, not silently reused."""
    output_dir = Path(cfg.output_dir)
    labels = task_labels(cfg)
    patch_size = [int(p) for p in cfg.data.patch_size]
    cases = task_cases(cfg)
    by_id = {c.case_id: c for c in cases}
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    train_ids, val_ids = fold_case_ids(cfg, list(by_id), write=rank == 0)
    plans_path = output_dir / "plans.json"
    if rank == 0:
        if plans_path.exists():
            plans = load_plans(plans_path)
            if plans.labels != labels:
                raise ValueError(f"{plans_path} was made for labels {plans.labels}, the task now has {labels}; "
                                 "use a new --output folder")
            if plans.patch_size != patch_size:
                raise ValueError(f"{plans_path} was made for data.patch_size={plans.patch_size}, the config now says "
                                 f"{patch_size}; use a new --output folder")
        else:
            plans = plan_from_training_cases(cases, labels, cfg)   # every training case, as nnU-Net plans
            save_plans(plans, plans_path)
        cache = preprocessed_root(cfg)
        dirs = preprocess_dataset([by_id[i] for i in sorted(set(train_ids) | set(val_ids))], plans, cache,
                                  int(cfg.preprocess.class_locations_per_class), progress=bool(cfg.train.progress))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank != 0:
            plans = load_plans(plans_path)
            cache = preprocessed_root(cfg)
            dirs = {i: cache / plans.digest() / i for i in sorted(set(train_ids) | set(val_ids))}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids], plans, dirs


def preprocessed_root(cfg) -> Path:
    """``preprocess.cache_dir``, or ``<output_dir>/../preprocessed`` (shared by the folds of one task and plan)."""
    return Path(cfg.preprocess.cache_dir) if cfg.preprocess.cache_dir else Path(cfg.output_dir).parent / "preprocessed"


def evaluate_fold(cfg, model, recipe, val_cases, plans: Plans, device: torch.device) -> dict:
    """Predict each validation case from its raw image, save it, and compute the metrics (a progress bar: i/N, ETA)."""
    from tqdm import tqdm

    output_dir = Path(cfg.output_dir)
    validation = output_dir / "validation"
    classes = evaluation_classes(plans.labels)
    regions = task_eval_regions(cfg)
    tolerance = {"default": float(cfg.metrics.nsd_tolerance_mm),
                 **{str(k): float(v) for k, v in cfg.task.nsd_tolerance_mm.items()}}
    score = dict(tolerance_mm=tolerance, nsd_method=str(cfg.metrics.nsd_method),
                 compute_hd95=bool(cfg.metrics.compute_hd95))
    per_case, region_cases, files = {}, {}, {}
    bar = tqdm(val_cases, desc="validation", unit="case", dynamic_ncols=True, disable=not bool(cfg.train.progress))
    for case in bar:
        t0 = time.time()
        image = read_volume(case.image)
        pred = predict_case(model, recipe, image, plans, cfg, device)
        pred_path = validation / f"{case.case_id}.nii.gz"
        save_label_nifti(pred, image, pred_path)
        gt = read_volume(case.label).array.astype(int)
        per_case[case.case_id] = evaluate_case(pred, gt, image.spacing_zyx, classes, **score)
        if regions:
            region_cases[case.case_id] = evaluate_case(pred, gt, image.spacing_zyx, regions, **score)
        files[case.case_id] = (str(case.label), str(pred_path))
        bar.write(f"  {case.case_id}: " + ", ".join(f"{k} DSC {v['dice']:.3f}" for k, v in per_case[case.case_id].items())
                  + f"  ({time.time() - t0:.1f}s)")
    summary = build_summary(per_case, classes, files, region_cases, regions)
    write_per_case_csv(per_case, output_dir / "per_case.csv")
    write_summary_json(summary, validation / "summary.json",
                       {"task": str(cfg.task.name), "head": str(cfg.head.name), "fold": str(cfg.fold),
                        "nsd_tolerance_mm": tolerance, "cases": sorted(per_case)})
    return summary


def load_trained_model(cfg, recipe, model_path: Path, device: torch.device, n_classes: int):
    """Rebuild the architecture from the config (no backbone weight file needed) and load a trained state dict."""
    build_cfg = OmegaConf.merge(cfg, {"model": {"init": "none"}})
    model = recipe.build_model(build_cfg, n_classes)
    state = torch.load(model_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # checkpoint_{best,final}.pth, latest.pt
        state = state["model"]
    model.load_state_dict(state)
    return model.to(device).eval()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = build_config(args)
    recipe = get_recipe(str(cfg.head.name))
    from finetune.train import atomic_torch_save, fit, setup_distributed

    rank, world, device = setup_distributed()
    output_dir = Path(cfg.output_dir)
    train_cases, val_cases, plans, dirs = prepare_fold(cfg, rank)
    if rank == 0:
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        print(f"task {cfg.task.name}: {len(train_cases)} training / {len(val_cases)} validation cases (fold {cfg.fold}), "
              f"classes {plans.labels[1:]}, target spacing {['%.3f' % s for s in plans.target_spacing_yx]} mm, "
              f"{world} process(es) on {device}",
              flush=True)
    train_dirs = [dirs[c.case_id] for c in train_cases]
    val_dirs = [dirs[c.case_id] for c in val_cases]
    if args.skip_training:
        model = load_trained_model(cfg, recipe, output_dir / "model_final.pt", device, len(plans.labels))
    elif recipe.fit is not None:
        from finetune.data import load_preprocessed

        model = recipe.fit(cfg, recipe, [load_preprocessed(d) for d in train_dirs],
                           [load_preprocessed(d) for d in val_dirs], output_dir, plans)
    else:
        model = fit(cfg, recipe, train_dirs, val_dirs, output_dir, plans)
    model = getattr(model, "module", model)
    summary: dict = {}
    if rank == 0:
        if not (output_dir / "model_final.pt").exists():
            atomic_torch_save(model.state_dict(), output_dir / "model_final.pt")
        summary = evaluate_fold(cfg, model, recipe, val_cases, plans, device)
        print()
        print(format_table({str(cfg.task.name): summary}, f"MedDINOv3 ({cfg.head.name})"))
        print(f"\nwrote {output_dir / 'validation' / 'summary.json'} and {output_dir / 'per_case.csv'}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    from finetune.console import finetune

    sys.exit(finetune())
