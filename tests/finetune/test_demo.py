"""The end-to-end demo (`make demo`) on the embedded real CT sample, with a reduced budget.

The demo's own config is used unchanged except for budgets (iterations, a 4-block ViT; dot-list overrides), so this pins the
real command chain: curation -> pretraining stages 1-3 -> finetune -> predict -> pictures -> summary.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from finetune import demo

PRETRAIN_FAST = ["student.overrides.depth=4", "train.global_batch_size=2", "data.max_batch_size_per_rank=2", "train.iterations=4",
                 "checkpointing.period=2", "checkpointing.teacher_snapshots=[2]", "stage2:train.iterations=2",
                 "stage2:gram.teacher.iteration=2", "stage3:train.iterations=2", "stage3:gram.teacher.iteration=2"]
FINETUNE_FAST = ["model.backbone_overrides.depth=4", "head.block_indices=[0,1,2,3]", "train.epochs=1", "train.iters_per_epoch=2", "train.val_iters=1", "data.patch_size=[64,64]"]
FAST = [
    "pretrain.overrides=[" + ",".join(f'"{o}"' for o in PRETRAIN_FAST) + "]",
    "finetune.overrides=[" + ",".join(f'"{o}"' for o in FINETUNE_FAST) + "]",
]


def test_build_demo_dataset_is_nnunet_raw_with_the_sample_geometry(sample_ct, tmp_path):
    dataset, splits = demo.build_demo_dataset(sample_ct, tmp_path)
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "spleen": 1}
    assert json.loads(splits.read_text()) == [{"train": ["totalseg_example", "totalseg_dicom"], "val": ["msd_spleen2"]}]
    # mean HU inside the spleen, as verified for these files in shared/data/real/SOURCES.md
    for case, source_label, spleen_id, spleen_hu in (
        ("totalseg_example", sample_ct / "totalsegmentator" / "example_seg_fast_force_split.nii.gz", 1, 33),
        ("msd_spleen2", sample_ct / "msd_spleen" / "sub-spleen2_ct_seg-manual.nii.gz", 1, 86),
        ("totalseg_dicom", sample_ct / "totalsegmentator_dicom" / "example_seg_dicom.nii.gz", 1, 80),
    ):
        image = nib.load(str(dataset / "imagesTr" / f"{case}_0000.nii.gz"))
        label = nib.load(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine, atol=1e-5)
        source = nib.load(str(source_label))
        got = np.asarray(label.dataobj)
        assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 1}
        # same voxels in world space: compare through nibabel's canonical (RAS) orientation
        expected = np.asarray(nib.as_closest_canonical(source).dataobj) == spleen_id
        np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(label).dataobj).astype(bool), expected)
        assert expected.sum() > 1000  # a real spleen in every case
        hu = np.asarray(image.dataobj, dtype=np.float32)[got > 0].mean()
        assert abs(hu - spleen_hu) < 3, (case, hu)
    dicom_image = nib.load(str(dataset / "imagesTr" / "totalseg_dicom_0000.nii.gz"))
    assert dicom_image.shape == (512, 512, 20) and dicom_image.get_data_dtype() == np.int16
    np.testing.assert_allclose(dicom_image.header.get_zooms(), (0.9765625, 0.9765625, 2.0), atol=1e-4)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_says_where_outputs_are(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.main(["--out", str(out), *FAST])
    printed = capsys.readouterr().out
    assert "MedDINOv3 demo finished" in printed
    assert (out / "ct3m" / "ct3m-000000.tar").is_file()
    for stage in (1, 2, 3):
        assert (out / "pretrain" / f"stage{stage}" / "teacher_backbone.pth").is_file()
    assert (out / "pretrain" / "teacher_backbone.pth").is_file()
    summary = json.loads((out / "finetune" / "validation" / "summary.json").read_text())
    assert "spleen" in json.dumps(summary)
    pred = nib.load(str(out / "predict" / "sub-spleen2_ct.nii.gz"))
    source = nib.load(str(demo.REPO_ROOT / "data_curation/sample_ct/msd_spleen/sub-spleen2_ct.nii.gz"))
    assert pred.shape == source.shape
    np.testing.assert_allclose(pred.affine, source.affine, atol=1e-4)
    pictures = sorted(p.name for p in (out / "pictures").glob("*.png"))
    assert pictures == ["finetune_scores.png", "overlays_msd_spleen2.png", "pca.png", "pretrain_curves.png",
                        "similarity_stages.png"]
    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["outputs"] == result["outputs"]
    for value in result["outputs"].values():
        assert str(out) in value or "Dataset001_DemoSpleen" in value

    # re-running continues: every tool finds its work done and the demo finishes again
    again = demo.main(["--out", str(out), *FAST])
    assert again["timings_s"]["pretrain"] < result["timings_s"]["pretrain"]
