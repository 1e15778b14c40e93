"""DINO-MVR (``finetune.heads.mvr``) and the ``folder2d`` task type (``finetune.tasks.folder2d``).

Real data: the ivadomed SEM micrographs with manual axon/myelin masks (2-D) and the MSD spleen CT with its
manual mask (volume); both trained for a few iterations through ``finetune/run.py`` with a tiny backbone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.heads.mvr import (
    MVRConfig, MVRProbeModel, entropy_fusion, few_shot_recovery, few_shot_subset, normalized_entropy,
    predict_volume, smooth_along_z, spatial_regularize, view_list,
)
from finetune.preprocess import read_case
from finetune.tasks.folder2d import convert_folder2d, find_cases
from meddino_datasets.case import Case
from pretrain.models import build_backbone

TINY = ["model.arch=vitt16", "model.init=random",
        "model.backbone_overrides={embed_dim: 64, depth: 4, num_heads: 4, n_storage_tokens: 4}"]
FAST = ["train.epochs=1", "train.val_iters=1", "train.progress=false", "train.precision=fp32", "infer.precision=fp32",
        "data.num_workers=0", "augment.enabled=false", "head.hidden_dim=32"]
SEM_CLASSES = {"axon": "_seg-axon-manual", "myelin": "_seg-myelin-manual"}


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vitt16", embed_dim=64, depth=4, num_heads=4)


@pytest.fixture(scope="module")
def spleen_slices(real_data: Path) -> np.ndarray:
    """Six axial slices (64 x 64 around the spleen) of the real MSD case, CT z-scored: ``[Z, Y, X]``."""
    folder = real_data / "ivadomed_msd_spleen"
    ct = nib.load(str(folder / "sub-spleen2_ct.nii.gz")).get_fdata().transpose(2, 1, 0)
    seg = nib.load(str(folder / "sub-spleen2_ct_seg-manual.nii.gz")).get_fdata().transpose(2, 1, 0)
    z, y, x = np.argwhere(seg > 0).mean(0).astype(int)
    img = np.clip(ct[z - 3:z + 3, y - 32:y + 32, x - 32:x + 32], -160, 240)
    return ((img - img.mean()) / img.std()).astype(np.float32)


@pytest.fixture(scope="module")
def sem_dataset(real_data: Path, tmp_path_factory) -> Path:
    return convert_folder2d(real_data / "ivadomed_sem_2d", tmp_path_factory.mktemp("sem") / "Dataset502_SEM",
                            SEM_CLASSES, pixel_spacing_mm=(1.0, 1.0), channel_name="SEM")


# ---------------------------------------------------------------- fusion and regularisation
def test_entropy_weights_favour_the_confident_view() -> None:
    confident = torch.tensor([0.9, 0.1])[:, None, None].expand(2, 3, 3)
    unsure = torch.tensor([0.25, 0.75])[:, None, None].expand(2, 3, 3)
    views = torch.stack([confident, unsure, unsure])[:, None]  # [V=3, N=1, C=2, 3, 3]
    assert (normalized_entropy(views[0]) < normalized_entropy(views[1])).all()
    fused = entropy_fusion(views, temperature=0.25, weighted=True)
    mean = entropy_fusion(views, temperature=0.25, weighted=False)
    assert torch.allclose(mean, views.mean(0))
    assert (fused[0, 0] > mean[0, 0]).all()  # pulled towards the confident view's class 0
    assert fused[0, 0, 0, 0] > 0.5 > mean[0, 0, 0, 0]  # the confident view wins the argmax
    assert torch.allclose(fused.sum(1), torch.ones(1, 3, 3))
    # equal entropies -> plain mean
    same = torch.stack([confident, confident.flip(0)])[:, None]
    assert torch.allclose(entropy_fusion(same, 0.25), same.mean(0), atol=1e-6)


def test_z_smoothing_and_component_removal() -> None:
    probs = np.zeros((2, 5, 8, 8), dtype=np.float32)
    probs[0] = 1.0
    probs[:, 2] = probs[::-1, 2]  # one slice claims class 1 everywhere
    smooth = smooth_along_z(probs, 1.0)
    assert smooth[1, 2].max() < 1.0 and smooth[1, 1].min() > 0.0
    assert np.allclose(smooth.sum(0), 1.0, atol=1e-6)
    assert smooth_along_z(probs[:, :1], 1.0) is not None and np.array_equal(smooth_along_z(probs[:, :1], 1.0), probs[:, :1])
    speck = np.zeros((2, 1, 16, 16), dtype=np.float32)
    speck[0] = 1.0
    speck[:, 0, 3, 3] = [0.1, 0.9]          # a 1-voxel component
    speck[:, 0, 8:14, 8:14] = [[[0.1]], [[0.9]]]  # a 36-voxel component
    cleaned = spatial_regularize(speck.copy(), sigma_px=0.0, min_component_voxels=4).argmax(0)
    assert cleaned[0, 3, 3] == 0 and cleaned[0, 10, 10] == 1


def test_views_and_single_view_switch() -> None:
    cfg = MVRConfig(scales=[0.75, 1.0], flips=[[], [-1]])
    assert len(view_list(cfg)) == 4
    assert view_list(MVRConfig(single_view=True)) == [(1.0, ())]


# ---------------------------------------------------------------- model
def test_probe_shapes_frozen_backbone_and_training(spleen_slices) -> None:
    label = torch.from_numpy((spleen_slices > 0.5).astype(np.int64))  # bright tissue: a real but easy target
    model = MVRProbeModel(tiny_backbone(), 2, MVRConfig(hidden_dim=16))
    x = torch.from_numpy(spleen_slices)[:, None, :60, :52]  # not a multiple of the patch size: padded inside
    assert model(x).shape == (6, 2, 60, 52)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    probes_before = [p.detach().clone() for p in model.probes.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    assert not model.backbone.training
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), label[:, :60, :52])
        loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(probes_before, model.probes.parameters()))
    concat = MVRProbeModel(tiny_backbone(), 2, MVRConfig(hidden_dim=16, probe_mode="concat"))
    assert concat.probes[0][0].in_channels == 3 * 64


def test_each_ablation_switch_changes_the_prediction(spleen_slices) -> None:
    model = MVRProbeModel(tiny_backbone(), 2, MVRConfig(hidden_dim=16))
    torch.nn.init.normal_(model.probes[0][-1].weight, std=0.5)  # non-trivial probe output
    volume = torch.from_numpy(spleen_slices)
    base = dict(hidden_dim=16, scales=[0.75, 1.0], flips=[[], [-1]], min_component_voxels=0)
    full = predict_volume(model, volume, MVRConfig(**base))
    assert full.shape == (2, 6, 64, 64) and torch.allclose(full.sum(0), torch.ones(6, 64, 64), atol=1e-5)
    for switch in ({"single_view": True}, {"entropy_weighting": False}, {"z_smoothing": False},
                   {"spatial_regularization": False}):
        other = predict_volume(model, volume, MVRConfig(**base, **switch))
        assert (other - full).abs().max() > 1e-4, switch


# ---------------------------------------------------------------- few-shot protocol
def test_few_shot_subset_and_recovery(tmp_path: Path) -> None:
    ids = [f"case_{i:02d}" for i in range(10)]
    five = few_shot_subset(ids, 5, seed=0)
    assert len(five) == 5 and five == few_shot_subset(list(reversed(ids)), 5, seed=0) and set(five) <= set(ids)
    assert five != few_shot_subset(ids, 5, seed=1)
    with pytest.raises(ValueError, match="few_shot_k"):
        few_shot_subset(ids, 11, seed=0)
    (tmp_path / "k.json").write_text(json.dumps({"mean": {"dice": 0.45}}))
    (tmp_path / "full.json").write_text(json.dumps({"mean": {"dice": 0.5}}))
    report = few_shot_recovery(tmp_path / "k.json", tmp_path / "full.json")
    assert report["recovery"] == pytest.approx(0.9)


# ---------------------------------------------------------------- folder2d
def test_folder2d_conversion_of_the_sem_set(sem_dataset: Path, real_data: Path) -> None:
    meta = json.loads((sem_dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "axon": 1, "myelin": 2} and meta["numTraining"] == 3
    src = real_data / "ivadomed_sem_2d"
    for case in find_cases(src, SEM_CLASSES):
        image, label = read_case(Case(case.case_id, sem_dataset / "imagesTr" / f"{case.case_id}_0000.nii.gz",
                                      sem_dataset / "labelsTr" / f"{case.case_id}.nii.gz"), 3)
        png = np.asarray(Image.open(case.image), dtype=np.float32)
        assert image.array.shape == (1, *png.shape)
        assert np.array_equal(image.array[0], png)  # [Z, Y, X] reads back the PNG's rows and columns
        axon = np.asarray(Image.open(case.masks["axon"])) > 127
        myelin = np.asarray(Image.open(case.masks["myelin"])) > 127
        assert np.array_equal(label[0] == 2, myelin)
        assert np.array_equal(label[0] == 1, axon & ~myelin)


def test_folder2d_errors_name_the_file(tmp_path: Path, real_data: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images/"):
        convert_folder2d(tmp_path, tmp_path / "out", {"x": ""})
    src = tmp_path / "src"
    shutil.copytree(real_data / "ivadomed_sem_2d", src)
    with pytest.raises(FileNotFoundError, match="sub-rat2_sample-data5_SEM_seg-nerve"):
        convert_folder2d(src, tmp_path / "out", {"nerve": "_seg-nerve"})


# ---------------------------------------------------------------- end to end through finetune/run.py
@pytest.mark.slow
def test_mvr_trains_predicts_and_evaluates_sem_2d(sem_dataset: Path, tmp_path: Path) -> None:
    from finetune.run import main

    splits = tmp_path / "splits.json"
    ids = sorted(p.name[:-len("_0000.nii.gz")] for p in (sem_dataset / "imagesTr").iterdir())
    splits.write_text(json.dumps([{"train": ids[:2], "val": ids[2:]}]))
    out = tmp_path / "run"
    summary = main(["--task", str(sem_dataset), "--head", "mvr", "--output", str(out), *TINY, *FAST,
                    f"splits_file={splits}", "preprocess.target_slice_px=null", "preprocess.target_spacing_mm=[6.0,6.0]", "data.patch_size=[64,64]",
                    "data.batch_size=2", "train.iters_per_epoch=3", "head.scales=[1.0,1.5]", "head.flips=[[],[-1]]",
                    "head.few_shot_k=1"])
    pred = nib.load(str(out / "validation" / f"{ids[2]}.nii.gz"))
    assert pred.shape == nib.load(str(sem_dataset / "imagesTr" / f"{ids[2]}_0000.nii.gz")).shape
    assert set(summary["per_class"]) == {"axon", "myelin"}
    assert all(0.0 <= summary["per_class"][c]["dice"] <= 1.0 for c in ("axon", "myelin"))
    assert json.loads((out / "validation" / "summary.json").read_text())["head"] == "mvr"


@pytest.mark.slow
def test_mvr_trains_predicts_and_evaluates_spleen_volume(spleen_nnunet_dataset, tmp_path: Path) -> None:
    from finetune.run import main

    ds, splits = spleen_nnunet_dataset
    out = tmp_path / "run"
    summary = main(["--task", str(ds), "--head", "mvr", "--output", str(out), *TINY, *FAST, f"splits_file={splits}",
                    "preprocess.target_slice_px=null", "preprocess.target_spacing_mm=[2.4,2.4]", "data.patch_size=[64,64]", "data.batch_size=4",
                    "train.iters_per_epoch=3", "head.scales=[1.0,1.5]", "head.flips=[[],[-1]]"])
    pred = nib.load(str(out / "validation" / "spleen2.nii.gz"))
    ref = nib.load(str(ds / "imagesTr" / "spleen2_0000.nii.gz"))
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine, atol=1e-4)
    assert 0.0 <= summary["per_class"]["spleen"]["dice"] <= 1.0
    assert (out / "model_final.pt").exists() and (out / "per_case.csv").exists()


def test_few_shot_fit_trains_on_k_cases_only(monkeypatch) -> None:
    """``head.few_shot_k`` hands exactly the seeded k-case subset to the common training loop."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import finetune.train
    from finetune.heads import mvr

    seen = {}
    monkeypatch.setattr(finetune.train, "fit",
                        lambda cfg, recipe, tr, va, out, plans: seen.update(train=tr, val=va, plans=plans))
    cases = [SimpleNamespace(case_id=f"c{i}") for i in range(6)]
    cfg = OmegaConf.create({"head": {"few_shot_k": 2, "few_shot_seed": 3}})
    mvr.fit(cfg, mvr.RECIPE, cases, cases[:1], "unused", "the plans")
    assert [c.case_id for c in seen["train"]] == few_shot_subset([c.case_id for c in cases], 2, 3)
    assert seen["val"] == cases[:1] and seen["plans"] == "the plans"
    mvr.fit(OmegaConf.create({"head": {"few_shot_k": None}}), mvr.RECIPE, cases, cases[:1], "unused", "the plans")
    assert seen["train"] == cases


def test_probes_train_at_the_native_slice_size(tmp_path) -> None:
    """DINO-MVR trains on whole native slices (512 px CT at its median spacing), not MedDINOv3's 896 px patch."""
    from finetune.config import load_config

    (tmp_path / "Dataset1_X").mkdir()
    cfg = load_config(str(tmp_path / "Dataset1_X"), "mvr")
    assert list(cfg.data.patch_size) == [512, 512] and cfg.preprocess.target_slice_px is None


def test_head_settings_are_strict() -> None:
    """The shipped head block maps onto MVRConfig exactly: no YAML key is dropped, none filled in by the class."""
    from omegaconf import OmegaConf

    from finetune.config import DEFAULT_CONFIGS_DIR
    from meddino_common.config import ConfigError

    block = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIGS_DIR / "heads" / "mvr.yaml").head)
    assert MVRConfig.from_cfg(block).n_last_blocks == 3
    with pytest.raises(ConfigError, match=r"^head.hiden_dim: not a setting of MVRConfig"):
        MVRConfig.from_cfg({**block, "hiden_dim": 8})
    del block["dropout"]
    with pytest.raises(ConfigError, match=r"^head.dropout: missing from the head's YAML"):
        MVRConfig.from_cfg(block)
