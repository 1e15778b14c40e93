"""Meta-architecture: heads, init from official weights, loss weighting per eq. (1)/(3) against an independent
computation, teacher EMA / no gradients, Gram teacher resize, one real-CT step."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.heads import DINOHead
from pretrain.train.config import load_config
from pretrain.train.stage_init import initialise_gram_teacher, initialise_weights
from pretrain.train.meta_arch import SSLMetaArch

GOLDEN_ARCH = ["student.arch=vitt16", "student.overrides={embed_dim: 64, num_heads: 4, depth: 4}"]


def test_dino_head_semantics() -> None:
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=50, hidden_dim=40, bottleneck_dim=8)
    assert head.last_layer.bias is None
    assert not any("weight_g" in n or "parametrizations" in n for n, _ in head.named_parameters())
    x = torch.randn(5, 32)
    h = x
    for layer in head.mlp:
        h = layer(h)
    expected = F.normalize(h, dim=-1) @ head.last_layer.weight.t()
    torch.testing.assert_close(head(x), expected)
    shapes = [tuple(m.weight.shape) for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert shapes == [(40, 32), (40, 40), (8, 40)]


def test_default_heads_match_the_paper(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs/pretrain/stage1.yaml")
    assert (cfg.dino.head_hidden_dim, cfg.dino.head_bottleneck_dim, cfg.dino.head_n_prototypes) == (2048, 256, 65536)
    assert (cfg.ibot.head_hidden_dim, cfg.ibot.head_bottleneck_dim, cfg.ibot.head_n_prototypes) == (2048, 256, 65536)
    assert cfg.dino.head_nlayers == cfg.ibot.head_nlayers == 3


def test_init_from_official_weights_sets_student_and_teacher(golden_dir: Path, make_tiny_cfg, tmp_path) -> None:
    golden = torch.load(golden_dir / "tiny_vit_official.pth", map_location="cpu", weights_only=True)
    cfg = make_tiny_cfg(tmp_path, tmp_path, *GOLDEN_ARCH)
    meta = SSLMetaArch.from_config(cfg)
    initialise_weights(meta, cfg, init_from=str(golden_dir / "tiny_vit_official.pth"))
    for tree in (meta.student, meta.teacher):
        sd = tree["backbone"].state_dict()
        assert sd.keys() == golden.keys()
        for k, v in golden.items():
            assert torch.equal(sd[k], v), k
    # heads are shared too: the teacher starts as an exact copy of the student
    for (n, a), (_, b) in zip(meta.student.named_parameters(), meta.teacher.named_parameters()):
        assert torch.equal(a, b), n


def test_init_with_a_mismatching_architecture_names_the_file(golden_dir: Path, make_tiny_cfg, tmp_path) -> None:
    cfg = make_tiny_cfg(tmp_path, tmp_path)  # vitt16 depth 2, embed 192: does not fit the golden file
    meta = SSLMetaArch.from_config(cfg)
    with pytest.raises(Exception, match="tiny_vit_official"):
        initialise_weights(meta, cfg, init_from=str(golden_dir / "tiny_vit_official.pth"))


def _brute_ce(student_logits, teacher_probs, temp):
    return -(teacher_probs * F.log_softmax(student_logits / temp, dim=-1)).sum()


@pytest.mark.parametrize("n_local", [8, 2])
def test_loss_weighting_equals_independent_computation(make_tiny_cfg, tmp_path, n_local: int) -> None:
    cfg = make_tiny_cfg(tmp_path, tmp_path, "gram.use_loss=true", "gram.loss_weight=2.0",
                        "dino.koleo_loss_weight=0.1")
    meta = SSLMetaArch.from_config(cfg)
    torch.manual_seed(1)
    B, K, D, P, n_g, M = 3, 7, 6, 4, 2, 5
    s_global = torch.randn(n_g * B, K)
    s_local = torch.randn(n_local * B, K)
    t_probs = torch.softmax(torch.randn(n_g, B, K), -1)
    cls = torch.randn(n_g * B, D)
    s_patch_logits, t_patch_probs = torch.randn(M, K), torch.softmax(torch.randn(M, K), -1)
    weights = torch.rand(M)
    s_patches, g_patches = torch.randn(n_g * B, P, D), torch.randn(n_g * B, P, D)
    total, logs = meta.compute_losses(
        student_out={"global_logits": s_global, "local_logits": s_local, "global_cls": cls,
                     "masked_patch_logits": s_patch_logits, "global_patches": s_patches},
        teacher_cls_probs=t_probs, teacher_patch_probs=t_patch_probs, masks_weight=weights,
        n_global=n_g, n_local=n_local, batch_size=B, gram_patches=g_patches, gram_weight=None,
    )
    # DINO: global pairs (s != t) and local pairs, each averaged, weighted by their share of pairs
    sg, sl = s_global.view(n_g, B, K), s_local.view(n_local, B, K)
    g_pairs = [(s, t) for s in range(n_g) for t in range(n_g) if s != t]
    l_pairs = [(s, t) for s in range(n_local) for t in range(n_g)]
    dino_g = sum(_brute_ce(sg[s], t_probs[t], 0.1) for s, t in g_pairs) / (len(g_pairs) * B)
    dino_l = sum(_brute_ce(sl[s], t_probs[t], 0.1) for s, t in l_pairs) / (len(l_pairs) * B)
    w_g, w_l = len(g_pairs) / (len(g_pairs) + len(l_pairs)), len(l_pairs) / (len(g_pairs) + len(l_pairs))
    if n_local == 8:
        assert (round(w_l, 3), round(w_g, 3)) == (0.889, 0.111)
    # KoLeo: per global crop over the batch, summed over crops
    koleo = 0.0
    for c in cls.view(n_g, B, D):
        x = F.normalize(c, dim=-1)
        dist = torch.cdist(x, x) + torch.eye(B) * 1e9
        koleo += -torch.log(dist.min(dim=1).values + 1e-8).mean()
    ibot = sum(weights[m] * _brute_ce(s_patch_logits[m], t_patch_probs[m], 0.1) for m in range(M)) / (n_g * B)
    xs, xg = F.normalize(s_patches, dim=-1), F.normalize(g_patches, dim=-1)
    gram = ((xs @ xs.transpose(1, 2) - xg @ xg.transpose(1, 2)) ** 2).mean()
    expected = w_g * dino_g + w_l * dino_l + 0.1 * koleo + ibot + 2.0 * gram
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert logs["dino_global_loss"] == pytest.approx(float(dino_g), rel=1e-5)
    assert logs["dino_local_loss"] == pytest.approx(float(dino_l), rel=1e-5)
    assert logs["koleo_loss"] == pytest.approx(float(koleo), rel=1e-4)
    assert logs["gram_loss"] == pytest.approx(float(gram), rel=1e-5)


def test_teacher_ema_update(make_tiny_cfg, tmp_path) -> None:
    meta = SSLMetaArch.from_config(make_tiny_cfg(tmp_path, tmp_path))
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in meta.teacher.parameters()]
    meta.update_teacher(0.99)
    for t0, t1, s in zip(before_t, meta.teacher.parameters(), meta.student.parameters()):
        torch.testing.assert_close(t1, 0.99 * t0 + 0.01 * s)
    assert not any(p.requires_grad for p in meta.teacher.parameters())


def test_real_ct_step_grads_only_in_the_student(ct3m_shards, make_tiny_cfg, tmp_path) -> None:
    from pretrain.data import build_ssl_loader

    cfg = make_tiny_cfg(ct3m_shards, tmp_path, "gram.use_loss=true", "gram.teacher.source=ema",
                        "crops.gram_teacher_crops_size=128")
    torch.manual_seed(0)
    meta = SSLMetaArch.from_config(cfg)
    initialise_weights(meta, cfg, None)
    initialise_gram_teacher(meta, cfg)
    meta.train()
    batch = next(build_ssl_loader(cfg, 0, 1, 0))
    assert batch["collated_gram_teacher_crops"].shape[-1] == 128
    out = meta.forward_backward(batch, teacher_temp=0.04)
    for k in ("dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "gram_loss", "total_loss"):
        assert math.isfinite(out.logs[k]), k
    assert all(p.grad is None for p in meta.teacher.parameters())
    assert all(p.grad is None for p in meta.gram_teacher.parameters())
    grads = {n: p.grad for n, p in meta.student.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["backbone.mask_token"].abs().sum() > 0  # masked patches reach the student


def test_gram_teacher_refresh_schedule(make_tiny_cfg, tmp_path) -> None:
    from pretrain.train.stage_init import GramRefresh

    cfg = make_tiny_cfg(tmp_path, tmp_path, "gram.teacher.refresh_every=10", "gram.teacher.max_refreshes=2",
                        "gram.teacher.refresh_start=5")
    due, done = [], 0
    for it in range(60):
        if GramRefresh.from_config(cfg).due(it, done):
            due.append(it)
            done += 1
    assert due == [15, 25]  # every 10 iterations after 5, at most twice
    off = make_tiny_cfg(tmp_path, tmp_path)
    assert not any(GramRefresh.from_config(off).due(it, 0) for it in range(100))


def test_gram_teacher_refresh_copies_the_ema_teacher(make_tiny_cfg, tmp_path) -> None:
    cfg = make_tiny_cfg(tmp_path, tmp_path, "gram.use_loss=true", "gram.teacher.source=ema")
    meta = SSLMetaArch.from_config(cfg)
    with torch.no_grad():
        for p in meta.teacher.parameters():
            p.add_(1.0)
    assert not meta.gram_teacher_initialized
    meta.refresh_gram_teacher_from_ema()
    assert meta.gram_teacher_initialized
    teacher = meta.teacher["backbone"].state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in meta.gram_teacher.state_dict().items())
    assert not any(p.requires_grad for p in meta.gram_teacher.parameters())
