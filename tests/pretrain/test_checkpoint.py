"""Checkpoint I/O: golden numerical compatibility with the official DINOv3 code, every input format,
round trips through our export and the Hugging Face layout, and clear errors on bad input."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.models import CheckpointError, build_backbone, detect_format, infer_arch, load_backbone, save_backbone
from pretrain.models.checkpoint import read_backbone_checkpoint
from pretrain.models.hf_format import save_hf_dir, to_hf

TOL = 2e-5


@pytest.fixture(scope="module")
def golden(golden_dir: Path):
    spec = json.loads((golden_dir / "tiny_vit_io.json").read_text())
    arrays = dict(np.load(golden_dir / "tiny_vit_io.npz"))
    return golden_dir / spec["checkpoint"], spec, arrays


@pytest.fixture(scope="module")
def official_sd(golden) -> dict[str, torch.Tensor]:
    return torch.load(golden[0], map_location="cpu", weights_only=True)


def _outputs(model, x: torch.Tensor, mask: torch.Tensor, grid_hw) -> dict[str, np.ndarray]:
    """Every array of tiny_vit_io.npz, produced by the calls described in tiny_vit_io.json."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ff = model.forward_features(x)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            out[key] = ff[key]
        out["forward"] = model(x)
        for i, (patch, cls) in enumerate(
            model.get_intermediate_layers(x, n=[0, 1, 2, 3], reshape=True, return_class_token=True, norm=True)
        ):
            out[f"inter_patch_{i}"], out[f"inter_cls_{i}"] = patch, cls
        for j, (patch, cls, storage) in enumerate(
            model.get_intermediate_layers(x, n=2, reshape=False, return_class_token=True,
                                          return_extra_tokens=True, norm=False)
        ):
            out[f"last2_raw_patch_{j}"], out[f"last2_raw_cls_{j}"], out[f"last2_raw_storage_{j}"] = patch, cls, storage
        masked = model.forward_features(x, masks=mask)
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
            out[f"masked_{key}"] = masked[key]
        out["rope_sin"], out["rope_cos"] = model.rope_embed(H=grid_hw[0], W=grid_hw[1])
        out["rope_periods"] = model.rope_embed.periods
    return {k: v.numpy() for k, v in out.items()}


def test_golden_official_checkpoint_reproduces_every_array(golden):
    path, spec, arrays = golden
    assert detect_format(path) == "official"
    model = load_backbone(path)
    assert not model.training
    assert (model.embed_dim, model.n_blocks, model.num_heads, model.n_storage_tokens) == (64, 4, 4, 4)
    x, mask = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["mask"])
    ours = _outputs(model, x, mask, spec["patch_grid_hw"])
    checked = 0
    for name, expected in arrays.items():
        if name in ("x", "mask"):
            continue
        assert name in ours, f"golden array {name} is not produced by the test"
        assert ours[name].shape == expected.shape, name
        diff = float(np.abs(ours[name] - expected).max())
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
        checked += 1
    assert checked == len(arrays) - 2 >= 24
    # forward() is the normed class token in eval (head = Identity)
    np.testing.assert_array_equal(ours["forward"], ours["x_norm_clstoken"])


def test_state_dict_keys_are_exactly_official(official_sd):
    model = build_backbone("vitb16", embed_dim=64, depth=4, num_heads=4)
    ours = model.state_dict()
    assert list(ours) == list(official_sd)  # same names, same order
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official_sd.items()}


def test_infer_arch_from_official_weights(official_sd):
    arch = infer_arch(official_sd)
    assert arch["embed_dim"] == 64 and arch["depth"] == 4 and arch["num_heads"] == 4
    assert arch["n_storage_tokens"] == 4 and arch["qkv_bias"] and arch["mask_k_bias"]
    assert arch["ffn_layer"] == "mlp" and arch["ffn_ratio"] == 4.0 and arch["patch_size"] == 16
    assert arch["pos_embed_rope_base"] == 100.0 and arch["pos_embed_rope_dtype"] == "fp32"


def test_round_trip_official_export_hf_back(golden, tmp_path):
    path, _, arrays = golden
    x = torch.from_numpy(arrays["x"])
    official = load_backbone(path)
    export = tmp_path / "backbone.safetensors"
    save_backbone(official, export)
    assert detect_format(export) == "export"
    from_export = load_backbone(export)
    assert from_export.config == official.config
    hf_dir = save_hf_dir(from_export, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "dinov3_vit" and config["num_register_tokens"] == 4
    assert detect_format(hf_dir) == "hf"
    from_hf = load_backbone(hf_dir)
    export2 = tmp_path / "again.safetensors"
    save_backbone(from_hf, export2)
    back = load_backbone(export2)
    with torch.no_grad():
        ref = official.forward_features(x)
        for model in (from_export, from_hf, back):
            out = model.forward_features(x)
            for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
                torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    # every official tensor survives except the K bias, which is masked to zero in the official model
    sd_ref, sd_back = official.state_dict(), back.state_dict()
    assert list(sd_back) == list(sd_ref)
    for key in sd_ref:
        if key.endswith("attn.qkv.bias"):
            d = sd_ref[key].shape[0] // 3
            keep = torch.ones(3 * d, dtype=torch.bool)
            keep[d: 2 * d] = False
            torch.testing.assert_close(sd_back[key][keep], sd_ref[key][keep], rtol=0, atol=0)
            assert not sd_back[key][~keep].any()
        else:
            torch.testing.assert_close(sd_back[key], sd_ref[key], rtol=0, atol=0)


def test_hf_layout_names_and_qkv_split(official_sd):
    model = build_backbone("vitb16", embed_dim=64, depth=4, num_heads=4)
    model.load_state_dict(official_sd)
    hf, config = to_hf(model)
    assert hf["embeddings.mask_token"].shape == (1, 1, 64)
    assert hf["embeddings.register_tokens"].shape == (1, 4, 64)
    assert hf["embeddings.patch_embeddings.weight"].shape == (64, 3, 16, 16)
    qkv = official_sd["blocks.2.attn.qkv.weight"]
    torch.testing.assert_close(hf["layer.2.attention.q_proj.weight"], qkv[:64], rtol=0, atol=0)
    torch.testing.assert_close(hf["layer.2.attention.k_proj.weight"], qkv[64:128], rtol=0, atol=0)
    torch.testing.assert_close(hf["layer.2.attention.v_proj.weight"], qkv[128:], rtol=0, atol=0)
    assert "layer.2.attention.k_proj.bias" not in hf and not config["key_bias"]
    torch.testing.assert_close(hf["layer.0.layer_scale2.lambda1"], official_sd["blocks.0.ls2.gamma"], rtol=0, atol=0)
    torch.testing.assert_close(hf["layer.3.mlp.down_proj.weight"], official_sd["blocks.3.mlp.fc2.weight"], rtol=0, atol=0)
    assert config["intermediate_size"] == 256 and config["hidden_act"] == "gelu"


def _wrap(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def test_meddinov3_release_wrapper_without_qkv_bias(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("meddinov3_vitb16", embed_dim=64, depth=2, num_heads=4).eval()
    assert "blocks.0.attn.qkv.bias" not in src.state_dict()
    heads = {"dino_head.mlp.0.weight": torch.randn(8, 64), "ibot_head.mlp.0.weight": torch.randn(8, 64)}
    path = tmp_path / "meddinov3_release.pth"
    torch.save({"teacher": {**_wrap(src.state_dict(), "backbone."), **heads}}, path)
    assert detect_format(path) == "meddinov3_release"
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = src(x)
        # qkv bias absence is inferred from the weights; eps (not stored) defaults to MedDINOv3's 1e-6 for this
        # layout, and the explicit ways give the same model
        for model in (load_backbone(path), load_backbone(path, norm_eps=1e-6),
                      load_backbone(path, arch="meddinov3_vitb16", embed_dim=64, depth=2, num_heads=4)):
            assert not model.config.qkv_bias and model.config.norm_eps == 1e-6
            torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        explicit = load_backbone(path, norm_eps=1e-5)  # the override still wins
        assert explicit.config.norm_eps == 1e-5 and not torch.equal(explicit(x), ref)
    # MedDINOv3's code computes RoPE in bf16: the stored periods are bf16 and that is inferred too
    assert src.rope_embed.periods.dtype == torch.bfloat16
    assert load_backbone(path).config.pos_embed_rope_dtype == "bf16"


def test_meddinov3_eps_choice_is_logged_with_the_override(tmp_path, caplog):
    """The eps default for a MedDINOv3 release is announced (file + option); a flat no-bias file is warned about."""
    torch.manual_seed(0)
    src = build_backbone("meddinov3_vitb16", embed_dim=64, depth=2, num_heads=4)
    release = tmp_path / "release.pth"
    torch.save({"teacher": {**_wrap(src.state_dict(), "backbone."), "dino_head.w": torch.zeros(2),
                            "ibot_head.w": torch.zeros(2)}}, release)
    flat = tmp_path / "flat_no_bias.pth"
    torch.save(src.state_dict(), flat)
    with caplog.at_level(logging.WARNING, logger="pretrain.models.checkpoint"):
        load_backbone(release)
    assert str(release) in caplog.text and "eps" in caplog.text and "norm_eps=1e-5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.models.checkpoint"):
        assert load_backbone(flat).config.norm_eps == 1e-5  # no MedDINOv3 wrapper: DINOv3 default, with a warning
    assert str(flat) in caplog.text and "norm_eps=1e-6" in caplog.text and "meddinov3_vitb16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.models.checkpoint"):
        load_backbone(release, norm_eps=1e-6)  # explicit: nothing to warn about
    assert "eps" not in caplog.text
    # a preset with qkv bias does not fit; the error says which option does
    with pytest.raises(CheckpointError, match="meddinov3_vitb16") as err:
        load_backbone(release, arch="vitb16", embed_dim=64, depth=2, num_heads=4)
    assert "missing from checkpoint" in str(err.value) and "attn.qkv.bias" in str(err.value)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": {**_wrap(sd, "teacher.backbone."), **_wrap({k: v + 1 for k, v in sd.items()},
                                                                         "student.backbone.")}, "iteration": 7},
        lambda sd: {"teacher": _wrap(sd, "module.backbone._checkpoint_wrapped_module.")},
        lambda sd: {"state_dict": _wrap(sd, "_orig_mod.module.")},
        lambda sd: _wrap({k.replace("blocks.1.", "blocks.1._checkpoint_wrapped_module."): v for k, v in sd.items()},
                         "backbone._orig_mod."),
        lambda sd: {"format": "meddinov3-ssl-1", "iteration": 5, "gram_teacher": None,  # pretrain.train layout
                    "student": {**_wrap({k: v * 0 for k, v in sd.items()}, "backbone."), "dino_head.w": torch.ones(2)},
                    "teacher": {**_wrap(sd, "backbone."), "dino_head.w": torch.ones(2), "ibot_head.w": torch.ones(2)},
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}},
    ],
    ids=["teacher+student", "module+ckptwrap", "orig_mod+module", "inner-ckptwrap", "pretrain.train"],
)
def test_training_checkpoint_wrappers_and_prefixes(wrap, official_sd, golden, tmp_path):
    path = tmp_path / "train.pth"
    torch.save(wrap(official_sd), path)
    assert detect_format(path) == "training"
    model = load_backbone(path)
    x = torch.from_numpy(golden[2]["x"])
    with torch.no_grad():
        np.testing.assert_allclose(model.forward_features(x)["x_norm_clstoken"].numpy(),
                                   golden[2]["x_norm_clstoken"], atol=TOL, rtol=0)


def test_prefer_student(official_sd, tmp_path):
    student = {k: (v * 2 if v.is_floating_point() and k != "rope_embed.periods" and "bias_mask" not in k else v)
               for k, v in official_sd.items()}
    path = tmp_path / "both.pth"
    torch.save({"teacher": _wrap(official_sd, "backbone."), "student": _wrap(student, "backbone.")}, path)
    t, s = load_backbone(path), load_backbone(path, prefer="student")
    torch.testing.assert_close(t.cls_token, official_sd["cls_token"])
    torch.testing.assert_close(s.cls_token, student["cls_token"])


def test_truncated_file_is_a_clear_error(golden, tmp_path):
    data = golden[0].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*(truncated|corrupt)"):
        load_backbone(bad)
    export = tmp_path / "e.safetensors"
    save_backbone(load_backbone(golden[0]), export)
    half = tmp_path / "half.safetensors"
    half.write_bytes(export.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"half\.safetensors"):
        load_backbone(half)


class _Payload:
    """An arbitrary pickled object: must never be unpickled."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_pickled_object_is_refused_by_weights_only(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load.*weights_only"):
        load_backbone(path)
    assert "this must not run" not in capsys.readouterr().out
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(CheckpointError, match=r"raw\.pkl"):
        load_backbone(raw)


def test_mismatched_architecture_lists_keys(golden, official_sd, tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_backbone(golden[0], arch="vits16")
    msg = str(err.value)
    assert "tiny_vit_official.pth" in msg and "shape mismatch" in msg and "missing from checkpoint" in msg
    assert "blocks.{0-3}.attn.qkv.weight: checkpoint (192, 64) vs model (1152, 384)" in msg
    # a dropped key (e.g. storage tokens) or an extra key can never be ignored silently
    sd = dict(official_sd)
    sd.pop("storage_tokens")
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone(path, arch="vitb16", embed_dim=64, depth=4, num_heads=4)
    msg = str(err.value)
    assert "broken.pth" in msg and "storage_tokens" in msg and "blocks.{0}.attn.extra" in msg


def test_not_a_backbone_and_missing_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth: no ViT backbone found"):
        load_backbone(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_backbone(tmp_path / "nope.pth")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_backbone(tmp_path / "dir")


def test_swiglu_no_storage_export_and_hf_round_trip(tmp_path):
    torch.manual_seed(1)
    src = build_backbone("vits16", embed_dim=96, depth=2, num_heads=2, ffn_layer="swiglu", ffn_ratio=6.0,
                         n_storage_tokens=0, layerscale_init=None).eval()
    assert infer_arch(src.state_dict())["ffn_layer"] == "swiglu"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        ref = src.forward_features(x)["x_prenorm"]
        flat = tmp_path / "flat.pth"
        torch.save(src.state_dict(), flat)
        for path in (flat, save_backbone(src, tmp_path / "s.safetensors"), save_hf_dir(src, tmp_path / "hf")):
            out = load_backbone(path).forward_features(x)["x_prenorm"]
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_export_cli(golden, tmp_path, capsys):
    from pretrain.models.export import main

    out, hf_dir = tmp_path / "b.safetensors", tmp_path / "hf"
    assert main(["--checkpoint", str(golden[0]), "--out", str(out), "--hf-dir", str(hf_dir)]) == 0
    printed = capsys.readouterr().out
    assert "official format" in printed and "max feature diff 0" in printed
    assert detect_format(out) == "export" and detect_format(hf_dir) == "hf"
    assert (hf_dir / "config.json").stat().st_mode & 0o044  # readable by others, like any written file
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    # eps cannot be inferred: --set passes it through and it is stored in the export's metadata
    assert main(["--checkpoint", str(golden[0]), "--out", str(out), "--set", "norm_eps=1e-6"]) == 0
    assert load_backbone(out).config.norm_eps == 1e-6


# ----------------------------------------------------------------------------------- against real timm
class _NoTorchvision:
    """Lets ``import timm`` succeed without torchvision (never installed here: it pins torch).

    timm's ViT/EVA model code does not use torchvision; only its data pipeline and two norm layers import it
    at package import time. Any ``torchvision.*`` import gets a module whose every attribute is an inert class;
    the entries are removed from ``sys.modules`` afterwards so no other library sees a fake torchvision.
    """

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return f"{cls.__name__}.{name}"

    def find_spec(self, fullname, path, target=None):
        import importlib.machinery

        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        import types

        meta = self._Meta

        class _Module(types.ModuleType):
            __path__: list = []

            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                value = meta(name, (), {"__init__": lambda *a, **k: None})
                setattr(self, name, value)
                return value

        return _Module(spec.name)

    def exec_module(self, module):
        return None


@pytest.fixture(scope="module")
def timm():
    import importlib.util
    import sys

    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install -e '.[interop]')")
    if importlib.util.find_spec("torchvision") is not None:
        import timm as real
        return real
    finder = _NoTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        import timm as real
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    return real


def _random_timm_dinov3(timm, variant: str, **kwargs):
    """A timm DINOv3 model (2 blocks) with every parameter random, so each one matters to the output."""
    torch.manual_seed(0)
    model = timm.create_model(variant, pretrained=False, depth=2, **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "gamma" in name or "bias" in name or "token" in name else 0.05))
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.add_(1.0)
    return model


@pytest.mark.parametrize("variant", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                     "vit_small_plus_patch16_dinov3"])
def test_timm_dinov3_weights_load_and_match_timm(timm, variant, tmp_path, caplog):
    """timm's own model and state dict: the loaded backbone gives timm's normalised tokens (cls, storage, patch)."""
    from safetensors.torch import save_file

    ref_model = _random_timm_dinov3(timm, variant)
    sd = ref_model.state_dict()
    pth = tmp_path / "timm.pth"
    torch.save(sd, pth)
    hub = tmp_path / "hub"  # the layout of a timm hub folder: config.json with "architecture" + model.safetensors
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": variant, "num_classes": 0}))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = ref_model.forward_features(x)  # [B, 1 + 4 + N, D] after the final norm
    for path in (pth, hub / "model.safetensors", hub):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            assert detect_format(path) == "timm"
            model = load_backbone(path)
        assert not [r for r in caplog.records if "MedDINOv3" in r.getMessage()]
        assert model.config.qkv_bias == variant.endswith("_qkvb") and model.config.norm_eps == 1e-5
        with torch.no_grad():
            ff = model.forward_features(x)
        ours = torch.cat([ff["x_norm_clstoken"][:, None], ff["x_storage_tokens"], ff["x_norm_patchtokens"]], 1)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # measured: 0.0


def test_timm_classifier_head_is_ignored_and_mismatch_names_timm(timm, tmp_path):
    sd = _random_timm_dinov3(timm, "vit_small_patch16_dinov3_qkvb", num_classes=7).state_dict()
    path = tmp_path / "timm_cls.pth"
    torch.save(sd, path)
    ckpt = read_backbone_checkpoint(path)
    assert ckpt.format == "timm" and "head" in ckpt.ignored_prefixes
    bias = ckpt.state_dict["blocks.1.attn.qkv.bias"]
    torch.testing.assert_close(bias, torch.cat([sd["blocks.1.attn.q_bias"], torch.zeros(384), sd["blocks.1.attn.v_bias"]]))
    with pytest.raises(CheckpointError, match=r"timm_cls\.pth \(timm format\) does not match arch='vitb16'"):
        load_backbone(path, arch="vitb16")


def test_bad_files_are_one_line_errors(golden, tmp_path):
    """A text file named .pth, a broken/incomplete HF config.json, an export without its 'arch' metadata."""
    from safetensors.torch import save_file

    text = tmp_path / "notes.pth"
    text.write_text("hello, these are my notes\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint \(a text file"):
        load_backbone(text)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a PyTorch checkpoint \(an empty file"):
        load_backbone(tmp_path / "empty.pth")

    model = load_backbone(golden[0])
    hf = save_hf_dir(model, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config)[:-5])
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read as JSON"):
        load_backbone(hf)
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    with pytest.raises(CheckpointError, match=r"hf: config\.json lacks \['num_hidden_layers'\]"):
        load_backbone(hf)

    export = save_backbone(model, tmp_path / "e.safetensors")
    from safetensors import safe_open

    with safe_open(str(export), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    for name, meta in (("noarch", {"format": metadata["format"]}), ("badarch", {**metadata, "arch": "{oops"})):
        save_file(tensors, tmp_path / f"{name}.safetensors", metadata=meta)
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors: .*'arch' metadata"):
            load_backbone(tmp_path / f"{name}.safetensors")


# ------------------------------------------------------------------------------ against real transformers
@pytest.fixture(scope="module")
def transformers():
    """The real transformers, with hub kernels off (they are downloaded at load time; no network here)."""
    module = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[interop]')")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USE_HUB_KERNELS", "0")
        yield module


def test_hf_export_processor_and_card_reproduce_the_ct_mapping(golden, transformers, repo_root, sample_ct, tmp_path,
                                                               capsys):
    """AutoImageProcessor + AutoModel on a real clamped CT slice give our transform's input and our features."""
    import nibabel as nib
    from omegaconf import OmegaConf

    from pretrain.data.transforms import HUTransform
    from pretrain.models.export import main

    hf_dir = tmp_path / "hf"
    assert main(["--checkpoint", str(golden[0]), "--out", str(tmp_path / "b.safetensors"), "--hf-dir", str(hf_dir)]) == 0
    assert "configs/pretrain/base.yaml" in capsys.readouterr().out
    block = OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml").data.transform  # the numbers' one home
    transform = HUTransform.from_config(block)
    ct = nib.load(str(sample_ct / "totalsegmentator" / "example_ct.nii.gz"))
    hu = np.asarray(ct.dataobj, dtype=np.float32)[:64, :48, ct.shape[2] // 2].T  # [H=48, W=64], real HU
    clamped = np.clip(hu, *block.hu_clamp)
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    pixel_values = processor(np.repeat(clamped[None], 3, axis=0), return_tensors="pt")["pixel_values"]
    expected = transform.expand_channels(transform(torch.from_numpy(hu))[None])  # [1, 3, H, W], training path
    assert pixel_values.shape == (1, 3, 48, 64)
    torch.testing.assert_close(pixel_values, expected, rtol=0, atol=1e-5)
    hf_model = transformers.AutoModel.from_pretrained(hf_dir).eval()
    ours = load_backbone(golden[0])
    with torch.no_grad():
        hf_tokens = hf_model(pixel_values=pixel_values).last_hidden_state
        ff = ours.forward_features(expected)
    ref = torch.cat([ff["x_norm_clstoken"][:, None], ff["x_storage_tokens"], ff["x_norm_patchtokens"]], 1)
    torch.testing.assert_close(hf_tokens, ref, rtol=0, atol=1e-4)
    card = (hf_dir / "README.md").read_text()
    for fact in ("clamp to [-1000, 1000] HU", "repeat the one channel to 3", "(x - 65.1084) / 178.0166",
                 "embed_dim 64, depth 4", "official DINOv3 release"):
        assert fact in card, fact
    assert "Numerical note" not in card  # fp32 RoPE: nothing changes


def test_meddinov3_release_hf_export_states_the_rope_dtype_change(transformers, tmp_path, capsys):
    torch.manual_seed(0)
    src = build_backbone("meddinov3_vitb16", embed_dim=64, depth=2, num_heads=4).eval()
    path = tmp_path / "release.pth"
    torch.save({"teacher": {**_wrap(src.state_dict(), "backbone."), "dino_head.w": torch.zeros(2),
                            "ibot_head.w": torch.zeros(2)}}, path)
    from pretrain.models.export import main

    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "b.safetensors"),
                 "--hf-dir", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    note = [line for line in printed.splitlines() if line.startswith("note")]
    assert note and "bf16" in note[0] and "fp32" in note[0] and "relative error" in note[0]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "## Numerical note" in card and "bf16" in card and "MedDINOv3 release" in card
    assert "dino_head" in card  # what was left out is said
    transformers.AutoModel.from_pretrained(tmp_path / "hf")  # and it still loads


def test_hf_export_of_a_training_run_documents_the_runs_own_transform(golden, official_sd, repo_root, tmp_path):
    """A training checkpoint's card and processor come from its run's config.yaml (here: other HU statistics)."""
    from omegaconf import OmegaConf

    from pretrain.models.export import export_backbone

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = OmegaConf.load(repo_root / "configs" / "pretrain" / "base.yaml")
    cfg.data.transform.mean, cfg.data.transform.std = 40.0, 350.0
    cfg.stage = "stage1"
    OmegaConf.save(cfg, run / "config.yaml")
    torch.save({"teacher": _wrap(official_sd, "backbone."), "iteration": 7}, run / "checkpoints" / "ckpt.pth")
    report = export_backbone(run / "checkpoints" / "ckpt.pth", tmp_path / "b.safetensors", tmp_path / "hf")
    assert report["source_format"] == "training" and report["transform_config"] == str(run / "config.yaml")
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [40.0] * 3 and processor["image_std"] == [350.0] * 3
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "(x - 40.0) / 350.0" in card and "`stage`: stage1" in card and "pretraining on CT" in card
