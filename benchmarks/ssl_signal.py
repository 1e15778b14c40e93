"""Evidence at small scale that stage-1 pretraining on real CT learns: frozen-feature probe + feature health.

    make evidence                     # = .venv/bin/python benchmarks/ssl_signal.py
    .venv/bin/python benchmarks/ssl_signal.py [--out runs/evidence] [--extra-ct DIR ...]
        [--external CKPT ...] [--config my_ssl_signal.yaml] [key=value ...]

Every setting is in ``configs/benchmarks/ssl_signal.yaml``; ``--config`` layers a file on it and ``key=value``
overrides single keys (both strict: an undeclared key or a value of the wrong type is an error naming it).
Steps, all on real CT, seeds fixed:

1. curate the embedded TotalSegmentator example CT (plus ``--extra-ct`` folders) into CT-3M shards with
   ``data_curation/build_ct3m.py``; the probe volume (MSD spleen, manual mask) is held out of pretraining;
2. stage 1 (``python -m pretrain.train``, DINO + iBOT + KoLeo) with a small ViT for a fixed iteration budget;
3. a linear (1x1-conv) probe on frozen patch features, two-fold over alternating z-blocks of slices (train on
   blocks A, predict blocks B, and the reverse; DSC per class over the whole volume, every slice predicted by
   the probe that did not see it, plus each fold's DSC as a spread), for: random init, the stage-1 EMA teacher, and each
   ``--external`` checkpoint (official DINOv3 / MedDINOv3 weights, read by ``pretrain.models.load_backbone``);
4. feature health of the same models: effective rank (RankMe) of patch and class tokens, mean pairwise cosine
   similarity (collapse -> ~1), the KoLeo / teacher-entropy / loss trajectories of the run, PCA map PNGs;
5. one printed table and ``OUT/ssl_signal.json``.

Re-running with the same ``--out`` reuses the finished curation and training (both resume), so only the
measurements are repeated; they are deterministic. (The curation refuses an ``--out`` built with another curation
config or input list: use a new ``--out`` then.) ``pretrain.iterations=N`` on the command line sets the budget.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from finetune.metrics import dice
from meddino_common.atomic import atomic_write_text
from meddino_common.config import ConfigError
from meddino_common.config import load_config as load_strict_config
from pretrain import evaluation as ev
from pretrain.models import build_backbone, load_backbone
from pretrain.train.meta_arch import backbone_overrides
from pretrain.visualize.config import load_config as load_visualize_config
from pretrain.visualize.figures import write_pca_png
from pretrain.visualize.inputs import load_axial_slice, load_input_transform

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "benchmarks" / "ssl_signal.yaml"
# the training step picks its device itself (pretrain.train: the GPU and bf16 autocast when present); the frozen
# feature extraction of the measurements follows it
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def repo_path(p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else REPO / p


def run(cmd: list[str], log: Path) -> None:
    """Run a step's command from the repository root, echoing and logging its output; fail loudly."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed (exit {proc.returncode}), see {log}: {' '.join(cmd)}")


# ---------------------------------------------------------------------------------------------- 1. curation
def pretraining_roots(cfg, extra: list[str], out: Path) -> Path:
    """The one ``folder`` root to curate: the configured root itself, or a folder of symlinks to all roots."""
    roots = [repo_path(r) for r in cfg.curation.roots] + [Path(e).resolve() for e in extra]
    for r in roots:
        if not r.exists():
            raise FileNotFoundError(f"pretraining CT folder not found: {r}")
    held_out = [repo_path(t.image).resolve() for t in cfg.probe.tasks if not t.seen_in_pretraining]
    for r in roots:
        for h in held_out:
            if h.is_relative_to(r.resolve()):
                raise ValueError(f"{h} is a held-out probe volume but lies inside the pretraining folder {r}")
    if len(roots) == 1:
        return roots[0]
    farm = out / "pretrain_ct"
    farm.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(roots):
        link = farm / f"root{i:02d}_{r.name}"
        if link.is_symlink() and link.resolve() != r.resolve():
            link.unlink()
        if not link.exists():
            link.symlink_to(r.resolve(), target_is_directory=r.is_dir())
    return farm


def curate(cfg, extra: list[str], out: Path) -> Path:
    shards = out / "ct3m"
    root = pretraining_roots(cfg, extra, out)
    run([sys.executable, "data_curation/build_ct3m.py", "--out", str(shards), "--config",
         str(repo_path(cfg.curation.config)), "--root", f"folder={root}", "--workers", str(cfg.curation.workers),
         "--no-progress"], out / "curation.log")
    return shards


# ---------------------------------------------------------------------------------------------- 2. stage 1
def pretrain_stage1(cfg, shards: Path, out: Path) -> Path:
    run_dir = out / "stage1"
    cmd = [sys.executable, "-m", "pretrain.train"]
    for c in cfg.pretrain.configs:
        cmd += ["--config", str(repo_path(c))]
    cmd += ["--output-dir", str(run_dir), "--resume", "auto", *[str(o) for o in cfg.pretrain.overrides],
            f"train.iterations={int(cfg.pretrain.iterations)}",
            f"data.shards={shards}", f"train.seed={cfg.seed}", f"data.seed={cfg.seed}",
            f"compute.num_threads={cfg.threads}"]
    run(cmd, out / "stage1.log")
    return run_dir


# ---------------------------------------------------------------------------------------------- 3-4. measure
def random_backbone(run_cfg, seed: int) -> torch.nn.Module:
    """The stage-1 architecture with seeded random weights (the baseline the run started from in kind)."""
    torch.manual_seed(seed)
    kwargs = backbone_overrides(run_cfg.student)
    return build_backbone(str(run_cfg.student.arch), **kwargs).eval()


def measure_model(model, tasks: list[dict], cfg, transform) -> dict:
    """Probe DSC per task/class and feature health on the probe volumes for one frozen backbone."""
    pc = cfg.probe
    result: dict = {"probe": {}, "health": {}}
    all_patch, all_cls = [], []
    for task in tasks:
        vol = task["volume"]
        x = ev.slice_batch(vol.hu, transform, int(pc.input_size))
        patch, cls = ev.backbone_features(model, x)
        all_patch.append(patch.reshape(-1, patch.shape[-1]))
        all_cls.append(cls)
        labels = torch.from_numpy(task["labels"])
        blocks_a, blocks_b = ev.split_slices(len(vol.hu), int(pc.split_block_slices))
        # two folds over the alternating z-blocks (train A -> test B, then train B -> test A): every slice is
        # predicted once by a probe that never saw it; DSC over the whole volume plus each fold's own DSC
        pred = np.zeros_like(task["labels"])
        folds = []
        for train, test in ((blocks_a, blocks_b), (blocks_b, blocks_a)):
            probe = ev.fit_linear_probe(patch[train], labels[train], len(task["classes"]) + 1, steps=int(pc.steps),
                                        lr=float(pc.lr), weight_decay=float(pc.weight_decay),
                                        standardize=bool(pc.standardize), seed=int(cfg.seed))
            pred[test] = ev.predict_probe(probe, patch[test], labels.shape[-2:]).numpy()
            gt = task["labels"][test]
            fold_dsc = {name: dice(pred[test] == i, gt == i) for i, name in enumerate(task["classes"], start=1)}
            folds.append({"dsc": fold_dsc, "mean_dsc": float(np.nanmean(list(fold_dsc.values()))),
                          "train_loss": probe.final_loss, "train_slices": train, "test_slices": test})
        gt = task["labels"]
        per_class = {name: dice(pred == i, gt == i) for i, name in enumerate(task["classes"], start=1)}
        result["probe"][task["name"]] = {"dsc": per_class, "mean_dsc": float(np.nanmean(list(per_class.values()))),
                                         "folds": folds}
    patch_all = ev.sample_rows(torch.cat(all_patch), int(cfg.health.max_patches), int(cfg.seed))
    cls_all = torch.cat(all_cls)
    result["health"] = {
        "patch_effective_rank": ev.effective_rank(patch_all),
        "cls_effective_rank": ev.effective_rank(cls_all),
        "patch_mean_cosine": ev.mean_pairwise_cosine(patch_all),
        "cls_mean_cosine": ev.mean_pairwise_cosine(cls_all),
        "n_patches": int(patch_all.shape[0]),
        "n_slices": int(cls_all.shape[0]),
    }
    return result


def load_tasks(cfg) -> list[dict]:
    """Probe volumes with their label maps remapped to 0 (background) .. C (the configured classes)."""
    tasks = []
    for t in cfg.probe.tasks:
        vol = ev.volume_slices(str(repo_path(t.image)), str(repo_path(t.label)))
        classes = list(t.classes.keys())
        labels = np.zeros_like(vol.labels)
        for i, name in enumerate(classes, start=1):
            labels[vol.labels == int(t.classes[name])] = i
        tasks.append({"name": str(t.name), "volume": vol, "labels": labels, "classes": classes,
                      "seen_in_pretraining": bool(t.seen_in_pretraining)})
    return tasks


def trajectories(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = ["total_loss", "dino_global_loss", "ibot_loss", "koleo_loss", "teacher_cls_entropy", "teacher_temp"]
    out = {"iterations": len(records)}
    for k in keys:
        v = ev.metric_values(records, k)
        if len(v):
            out[k] = ev.series_summary(v, 5)
    return out


def pca_pictures(models: dict, cfg, transform, out: Path) -> list[str]:
    vcfg = load_visualize_config(overrides={"pca.resolutions": list(cfg.health.pca_resolutions)})
    task = next(t for t in cfg.probe.tasks if t.name == cfg.health.pca_task)
    ct = load_axial_slice(repo_path(task.image), vcfg.image.slice, vcfg.foreground.body_threshold_hu,
                          vcfg.image.default_slice_near_max)
    paths = []
    for name, model in models.items():
        paths.append(str(write_pca_png(model, ct, out / f"pca_{name}.png", vcfg, transform, label=name)))
    return paths


# ---------------------------------------------------------------------------------------------- 5. report
def fmt(v: float, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def table(report: dict) -> str:
    tasks = list(next(iter(report["models"].values()))["probe"])
    head = ["model"]
    for t in tasks:
        head += [f"{t} mean DSC"]
    head += ["patch eff.rank", "cls eff.rank", "patch cos", "cls cos"]
    rows = [head]
    for name, m in report["models"].items():
        row = [name] + [fmt(m["probe"][t]["mean_dsc"]) for t in tasks]
        h = m["health"]
        row += [fmt(h["patch_effective_rank"], 1), fmt(h["cls_effective_rank"], 1), fmt(h["patch_mean_cosine"]),
                fmt(h["cls_mean_cosine"])]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for t in tasks:
        lines.append(f"\nDSC per class, {t} (every slice predicted by the fold that held it out; fold A / B means):")
        for name, m in report["models"].items():
            per = ", ".join(f"{c} {fmt(v)}" for c, v in m["probe"][t]["dsc"].items())
            folds = " / ".join(fmt(f["mean_dsc"]) for f in m["probe"][t]["folds"])
            lines.append(f"  {name}: {per}  (folds {folds})")
    tr = report["trajectories"]
    lines.append(f"\nstage-1 trajectories ({tr['iterations']} iterations; 5 evenly spaced points):")
    for k, v in tr.items():
        if k != "iterations":
            lines.append(f"  {k}: " + " -> ".join(fmt(x) for x in v))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="a YAML file layered on configs/benchmarks/ssl_signal.yaml (declared keys only)")
    p.add_argument("--out", default="runs/evidence", help="output folder (default: %(default)s)")
    p.add_argument("--extra-ct", action="append", default=[], metavar="DIR",
                   help="another folder of CT (NIfTI / DICOM) to pretrain on (repeatable)")
    p.add_argument("--external", action="append", default=[], metavar="CKPT",
                   help="also probe this backbone checkpoint (official DINOv3 / MedDINOv3 / our export)")
    p.add_argument("--external-arch", default=None, help="architecture for --external (default: inferred)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the benchmark config")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_strict_config([DEFAULT_CONFIG], [args.config] if args.config else [], args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for e in args.external:
        if not Path(e).exists():
            raise FileNotFoundError(f"--external checkpoint not found: {e}")
    out = repo_path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()

    shards = curate(cfg, args.extra_ct, out)
    t_curate = time.perf_counter()
    run_dir = pretrain_stage1(cfg, shards, out)
    t_train = time.perf_counter()

    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    transform = load_input_transform(run_dir / "config.yaml")
    tasks = load_tasks(cfg)
    models = {
        "random init": lambda: random_backbone(run_cfg, int(cfg.seed)),
        "stage 1": lambda: load_backbone(str(run_dir / "teacher_backbone.pth")),
    }
    for e in args.external:
        models[f"external {Path(e).name}"] = lambda e=e: load_backbone(str(e), arch=args.external_arch)
    report: dict = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/ssl_signal.py", *(argv or sys.argv[1:])]),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "pretraining": {"shards": str(shards), "manifest_samples": sum(1 for _ in open(shards / "manifest.csv")) - 1,
                        "run_dir": str(run_dir)},
        "held_out": [t["name"] for t in tasks if not t["seen_in_pretraining"]],
        "models": {},
    }
    pca_models = {}
    for name, make in models.items():
        torch.manual_seed(int(cfg.seed))
        model = make()
        report["models"][name] = measure_model(model.to(DEVICE), tasks, cfg, transform)
        model.cpu()  # the PCA pictures run on CPU
        if name in ("random init", "stage 1"):
            pca_models[name.replace(" ", "_")] = model
    report["trajectories"] = trajectories(run_dir)
    report["pca_png"] = pca_pictures(pca_models, cfg, transform, out)
    report["seconds"] = {"curation": t_curate - t0, "stage1": t_train - t_curate,
                         "measure": time.perf_counter() - t_train}
    text = table(report)
    print("\n" + text)
    atomic_write_text(out / "ssl_signal.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(out / "ssl_signal.txt", text + "\n")
    print(f"\nwrote {out / 'ssl_signal.json'}, {out / 'ssl_signal.txt'} and {', '.join(report['pca_png'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
