"""DINOv3 ViT behaviour: shapes at any multiple-of-16 size, masking, crop-group list forward, intermediate
layers, train/eval semantics (RoPE augmentation, drop path), grad checkpointing, presets and options."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pretrain.models import ARCH_PRESETS, DinoVisionTransformer, build_backbone


def tiny(**kw) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vitb16", **{"embed_dim": 64, "depth": 3, "num_heads": 4, **kw})


@pytest.fixture(scope="module")
def ct_slice(sample_ct) -> torch.Tensor:
    """A real CT slice (HU windowed to [0, 1], 3 channels, 96 x 128 crop) from the embedded sample."""
    import nibabel as nib

    paths = sorted(sample_ct.rglob("*.nii.gz"))
    images = [p for p in paths if "seg" not in p.name and "label" not in p.name and "mask" not in p.name]
    assert images, f"no CT volume under {sample_ct}"
    vol = np.asarray(nib.load(str(images[0])).dataobj, dtype=np.float32)
    sl = vol[..., vol.shape[-1] // 2]
    sl = np.clip((sl + 160.0) / 400.0, 0, 1)  # abdomen window W400/L40
    h, w = (min(sl.shape[0], 96) // 16) * 16, (min(sl.shape[1], 128) // 16) * 16
    x = torch.from_numpy(np.ascontiguousarray(sl[:h, :w]))
    return x.expand(3, h, w).unsqueeze(0).clone()


@pytest.mark.parametrize("hw", [(32, 32), (64, 48), (48, 112), (128, 64)])
def test_shapes_any_size_non_square(hw):
    model = tiny().eval()
    H, W = hw
    h, w = H // 16, W // 16
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        ff = model.forward_features(x)
        assert ff["x_norm_clstoken"].shape == (2, 64)
        assert ff["x_storage_tokens"].shape == (2, 4, 64)
        assert ff["x_norm_patchtokens"].shape == (2, h * w, 64)
        assert ff["x_prenorm"].shape == (2, 1 + 4 + h * w, 64)
        assert ff["masks"] is None
        assert model(x).shape == (2, 64)
        (patch, cls, storage), = model.get_intermediate_layers(
            x, n=1, reshape=True, return_class_token=True, return_extra_tokens=True
        )
        assert patch.shape == (2, 64, h, w) and cls.shape == (2, 64) and storage.shape == (2, 4, 64)
        # reshape keeps the row-major patch order of forward_features
        torch.testing.assert_close(patch.flatten(2).transpose(1, 2), ff["x_norm_patchtokens"])


def test_real_ct_slice_features(ct_slice):
    model = tiny().eval()
    with torch.no_grad():
        ff = model.forward_features(ct_slice)
    n = (ct_slice.shape[-2] // 16) * (ct_slice.shape[-1] // 16)
    assert ff["x_norm_patchtokens"].shape == (1, n, 64)
    assert torch.isfinite(ff["x_prenorm"]).all()
    # patches of different tissue give different features
    assert ff["x_norm_patchtokens"][0].std(0).mean() > 1e-3


def test_bad_inputs_are_clear_errors():
    model = tiny().eval()
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        model(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="masks must be"):
        model.forward_features(torch.randn(1, 3, 32, 32), masks=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block indices"):
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=[0, 7])
    with pytest.raises(ValueError, match="n=4"):
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=4)
    with pytest.raises(TypeError, match="unknown backbone option"):
        build_backbone("vitb16", embed_dims=64)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vitz16")


def test_eval_is_deterministic_train_rope_varies():
    model = tiny(drop_path_rate=0.0, layerscale_init=1.0).eval()  # LayerScale 1 so attention matters
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()  # rescale_coords=2 (preset) -> random RoPE coordinates every call
        torch.manual_seed(1)
        c, d = model(x), model(x)
        assert not torch.allclose(c, d) and not torch.allclose(c, a)
        model.eval()
        assert torch.equal(model(x), a)
        no_aug = tiny(pos_embed_rope_rescale_coords=None, layerscale_init=1.0).train()
        no_aug.load_state_dict(model.state_dict())
        torch.testing.assert_close(no_aug(x), a)  # no augmentation configured -> train == eval here


def test_masked_tokens_replaced_by_mask_token():
    model = tiny().eval()
    with torch.no_grad():
        model.mask_token.normal_()
        x = torch.randn(2, 3, 32, 48)
        none_masked = torch.zeros(2, 6, dtype=torch.bool)
        torch.testing.assert_close(model.forward_features(x, masks=none_masked)["x_prenorm"],
                                   model.forward_features(x)["x_prenorm"])
        all_masked = torch.ones(2, 6, dtype=torch.bool)
        out = model.forward_features(x, masks=all_masked)
        other = model.forward_features(torch.randn(2, 3, 32, 48), masks=all_masked)
        torch.testing.assert_close(out["x_prenorm"], other["x_prenorm"])  # image content fully hidden
        assert out["masks"] is all_masked


def test_list_forward_matches_separate_calls():
    model = tiny().eval()
    globals_, locals_ = torch.randn(4, 3, 64, 64), torch.randn(6, 3, 32, 32)
    masks = torch.rand(4, 16) < 0.3
    with torch.no_grad():
        out_g, out_l = model.forward_features_list([globals_, locals_], [masks, None])
        ref_g, ref_l = model.forward_features(globals_, masks=masks), model.forward_features(locals_)
    for got, ref in ((out_g, ref_g), (out_l, ref_l)):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
    assert out_g["masks"] is masks and out_l["masks"] is None
    as_list = model.forward_features([globals_, locals_], [masks, None])
    torch.testing.assert_close(as_list[1]["x_prenorm"], out_l["x_prenorm"])


def test_intermediate_layers_n_int_equals_index_list():
    model = tiny().eval()
    x = torch.randn(1, 3, 48, 32)
    with torch.no_grad():
        last2 = model.get_intermediate_layers(x, n=2, norm=False)
        idx = model.get_intermediate_layers(x, n=[1, 2], norm=False)
        for a, b in zip(last2, idx):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        final = model.get_intermediate_layers(x, n=1, norm=True)[0]
        torch.testing.assert_close(final, model.forward_features(x)["x_norm_patchtokens"])


def test_grad_checkpointing_same_outputs_and_grads():
    x = torch.randn(2, 3, 32, 48)
    results = []
    for ckpt in (False, True):
        model = tiny(pos_embed_rope_rescale_coords=None).train()
        model.set_grad_checkpointing(ckpt)
        out = model.forward_features(x)
        loss = out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].mean()
        loss.backward()
        results.append((loss.detach(), model.blocks[0].attn.qkv.weight.grad.clone(), model.cls_token.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_drop_path_sample_subset_training():
    model = tiny(drop_path_rate=0.5, pos_embed_rope_rescale_coords=None, layerscale_init=1.0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
    model.train()
    torch.manual_seed(3)
    out = model.forward_features([x, x[:3, :, :16, :16]], None)
    loss = sum(o["x_norm_clstoken"].sum() for o in out)
    loss.backward()
    assert model.mask_token.grad is not None  # kept in the graph even without masks (DDP)
    assert not torch.allclose(out[0]["x_norm_clstoken"], ref)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)  # drop path is off in eval


def test_swiglu_and_options():
    model = build_backbone("vits16", depth=1, ffn_layer="swiglu", ffn_ratio=6.0)
    assert model.blocks[0].mlp.w1.out_features == 1536  # DINOv3 vits16plus hidden width
    no_bias = build_backbone("vitt16", depth=1, qkv_bias=False)
    assert "blocks.0.attn.qkv.bias" not in no_bias.state_dict()
    assert "blocks.0.attn.qkv.bias_mask" not in no_bias.state_dict()
    no_ls = build_backbone("vitt16", depth=1, layerscale_init=None, n_storage_tokens=0)
    assert "blocks.0.ls1.gamma" not in no_ls.state_dict() and "storage_tokens" not in no_ls.state_dict()
    with torch.no_grad():
        assert no_ls.forward_features(torch.randn(1, 3, 32, 32))["x_storage_tokens"].shape == (1, 0, 192)
    official_eps = DinoVisionTransformer(embed_dim=64, depth=1, num_heads=4, norm_layer="layernorm")
    assert official_eps.norm.eps == 1e-6
    # the official ``norm_layer`` name also works as a preset override (it replaces the preset's eps)
    assert build_backbone("vitt16", depth=1, norm_layer="layernorm").norm.eps == 1e-6
    assert build_backbone("vitt16", depth=1, norm_layer="layernorm", norm_eps=1e-3).norm.eps == 1e-3
    assert set(ARCH_PRESETS) >= {"vitt16", "vits16", "vitb16", "vitl16", "meddinov3_vitb16"}
    assert ARCH_PRESETS["meddinov3_vitb16"]["norm_eps"] == 1e-6 and not ARCH_PRESETS["meddinov3_vitb16"]["qkv_bias"]


def test_k_bias_is_masked():
    model = tiny().eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        ref = model(x)
        qkv = model.blocks[0].attn.qkv
        qkv.bias[64:128] += 5.0  # K part of the bias is multiplied by bias_mask = 0
        assert torch.equal(model(x), ref)
        qkv.bias[:64] += 5.0
        assert not torch.equal(model(x), ref)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_backend_needs_xformers():
    with pytest.raises(ImportError, match="xformers"):
        tiny(attn_backend="xformers")
