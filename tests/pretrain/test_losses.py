"""Losses against independent brute-force computations (float64 loops on tiny inputs)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pretrain.losses import dino_loss, gram_loss, ibot_loss, koleo_loss, resize_patch_grid, sinkhorn_knopp


def _log_softmax_rows(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    for i in range(z.shape[0]):
        m = max(z[i])
        lse = m + math.log(sum(math.exp(v - m) for v in z[i]))
        out[i] = [v - lse for v in z[i]]
    return out


def _sinkhorn_reference(logits: np.ndarray, temp: float, n_iter: int) -> np.ndarray:
    """The textbook algorithm in float64 (no max subtraction): Q = exp(L/T)^T, alternate normalisations."""
    n, k = logits.shape
    q = np.exp(logits.astype(np.float64) / temp).T  # [K, N]
    q /= q.sum()
    for _ in range(n_iter):
        for r in range(k):
            q[r, :] /= q[r, :].sum()
        q /= k
        for c in range(n):
            q[:, c] /= q[:, c].sum()
        q /= n
    return (q * n).T


def test_sinkhorn_matches_reference_and_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5)
    probs = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=3)
    expected = _sinkhorn_reference(logits.numpy(), 0.5, 3)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), np.ones(7), atol=1e-6)
    # more iterations -> prototype marginals approach uniform N/K
    many = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=50)
    np.testing.assert_allclose(many.sum(dim=0).numpy(), np.full(5, 7 / 5), rtol=1e-4)


def test_sinkhorn_large_logits_do_not_overflow() -> None:
    """logits/T up to ~300: exp overflows fp32 in the naive form; the max-shifted form stays exact."""
    torch.manual_seed(1)
    logits = torch.randn(6, 4) + 10.0
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()  # the naive fp32 form would overflow
    probs = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert torch.isfinite(probs).all()
    shifted = logits.numpy().astype(np.float64) - 10.0  # reference in float64 is safe after a shift
    np.testing.assert_allclose(probs.numpy(), _sinkhorn_reference(shifted, 0.04, 3), rtol=1e-4, atol=1e-7)


_WORKER_SOURCE = """
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.losses import sinkhorn_knopp


def run(rank, world, init_file, rows, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probs = sinkhorn_knopp(rows[rank], teacher_temp=0.07, n_iterations=3)
        torch.save(probs, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
"""


def test_sinkhorn_two_process_gloo_equals_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uneven rows on 2 real gloo ranks (torch.multiprocessing.spawn) == 1 process on the concatenated rows."""
    # spawned children must import the worker by module name; test modules are not importable packages
    (tmp_path / "sinkhorn_gloo_worker.py").write_text(_WORKER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sinkhorn_gloo_worker

    torch.manual_seed(2)
    rows = [torch.randn(3, 6) * 0.5, torch.randn(5, 6) * 0.5]
    mp.spawn(sinkhorn_gloo_worker.run, args=(2, str(tmp_path / "init"), rows, str(tmp_path)), nprocs=2, join=True)
    distributed = torch.cat([torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)])
    single = sinkhorn_knopp(torch.cat(rows), teacher_temp=0.07, n_iterations=3)
    torch.testing.assert_close(distributed, single, rtol=1e-6, atol=1e-7)
    # and not trivially: each rank alone gives something different
    alone = torch.cat([sinkhorn_knopp(r, teacher_temp=0.07) for r in rows])
    assert not torch.allclose(alone, single, atol=1e-4)


@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_brute_force(ignore_diagonal: bool) -> None:
    torch.manual_seed(3)
    n_s, n_t, batch, k, temp = 3, 2, 4, 5, 0.1
    student = torch.randn(n_s, batch, k)
    teacher = torch.softmax(torch.randn(n_t, batch, k), dim=-1)
    got = dino_loss(student, teacher, student_temp=temp, ignore_diagonal=ignore_diagonal)
    total, pairs = 0.0, 0
    for s in range(n_s):
        log_p = _log_softmax_rows(student[s].double().numpy() / temp)
        for t in range(n_t):
            if ignore_diagonal and s == t:
                continue
            for b in range(batch):
                total += -sum(teacher[t, b, j].item() * log_p[b, j] for j in range(k))
                pairs += 1
    assert got.item() == pytest.approx(total / pairs, rel=1e-5)


def test_dino_loss_global_local_shares_match_paper() -> None:
    """2 global + 8 local crops: local pairs are 16/18 = 0.889 of all pairs, global 2/18 = 0.111."""
    torch.manual_seed(4)
    teacher = torch.softmax(torch.randn(2, 3, 6), dim=-1)
    local, glob = torch.randn(8, 3, 6), torch.randn(2, 3, 6)
    all_pairs = dino_loss(torch.cat([glob, local]), teacher)
    weighted = (16 / 20) * dino_loss(local, teacher) + (4 / 20) * dino_loss(glob, teacher)
    assert all_pairs.item() == pytest.approx(weighted.item(), rel=1e-6)


def test_ibot_loss_brute_force() -> None:
    torch.manual_seed(5)
    masks = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # 3 images, 4 patches
    m, k, temp = int(masks.sum()), 6, 0.1
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    student = torch.randn(m, k)
    teacher = torch.softmax(torch.randn(m, k), dim=-1)
    got = ibot_loss(student, teacher, weights, n_images=3, student_temp=temp)
    log_p = _log_softmax_rows(student.double().numpy() / temp)
    expected = 0.0
    for i in range(m):
        expected += weights[i].item() * -sum(teacher[i, j].item() * log_p[i, j] for j in range(k))
    assert got.item() == pytest.approx(expected / 3, rel=1e-5)


def test_koleo_loss_brute_force() -> None:
    torch.manual_seed(6)
    x = torch.randn(6, 4) * 3.0
    got = koleo_loss(x)
    rows = [v / max(np.linalg.norm(v), 1e-8) for v in x.double().numpy()]
    expected = 0.0
    for i, xi in enumerate(rows):
        dists = [np.sqrt(np.sum((xi - xj) ** 2)) if j != i else np.inf for j, xj in enumerate(rows)]
        nn_idx = int(np.argmin(dists))
        d = np.sqrt(np.sum((xi - rows[nn_idx] + 1e-8) ** 2))  # pairwise_distance adds eps to the difference
        expected += -math.log(d + 1e-8)
    assert got.item() == pytest.approx(expected / len(rows), rel=1e-5)


def test_koleo_loss_lower_when_spread() -> None:
    clustered = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(spread) < koleo_loss(clustered)


def _gram_reference(s: np.ndarray, t: np.ndarray, img_level: bool, normalize: bool, remove_neg: bool) -> float:
    def prep(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x if img_level else x.reshape(1, -1, x.shape[-1])

    s, t = prep(s), prep(t)
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                gs, gt = float(s[b, i] @ s[b, j]), float(t[b, i] @ t[b, j])
                if remove_neg:
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("remove_neg", [False, True])
def test_gram_loss_brute_force(img_level: bool, normalize: bool, remove_neg: bool) -> None:
    torch.manual_seed(7)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    got = gram_loss(s, t, img_level=img_level, normalize=normalize, remove_neg=remove_neg)
    expected = _gram_reference(s.numpy(), t.numpy(), img_level, normalize, remove_neg)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gram_loss_zero_for_identical_features() -> None:
    x = torch.randn(3, 9, 8)
    assert gram_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert gram_loss(x, x.clone(), img_level=False).item() == pytest.approx(0.0, abs=1e-12)


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bicubic_resize_reference(grid: np.ndarray, out: int) -> np.ndarray:
    """Separable Keys-cubic (a=-0.75) resample, half-pixel centres, clamped borders: [n, n] -> [out, out]."""
    n = grid.shape[0]
    scale = n / out

    def weights_1d() -> np.ndarray:
        w = np.zeros((out, n))
        for o in range(out):
            src = (o + 0.5) * scale - 0.5
            base = math.floor(src)
            for tap in range(base - 1, base + 3):
                w[o, min(max(tap, 0), n - 1)] += _cubic(src - tap)
        return w

    w = weights_1d()
    return w @ grid @ w.T


@pytest.mark.parametrize("n_in,n_out", [(8, 4), (14, 7), (6, 4), (3, 5)])
def test_resize_patch_grid_matches_bicubic_reference(n_in: int, n_out: int) -> None:
    torch.manual_seed(8)
    d = 3
    teacher = torch.randn(2, n_in * n_in, d)
    got = resize_patch_grid(teacher, n_out * n_out)
    assert got.shape == (2, n_out * n_out, d)
    for b in range(2):
        for c in range(d):
            grid = teacher[b, :, c].double().numpy().reshape(n_in, n_in)  # row-major token grid
            expected = _bicubic_resize_reference(grid, n_out).reshape(-1)
            np.testing.assert_allclose(got[b, :, c].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_resize_patch_grid_keeps_equal_grids_and_the_dtype() -> None:
    tokens = torch.randn(2, 25, 3, dtype=torch.bfloat16)
    assert resize_patch_grid(tokens, 25) is tokens  # same grid: no resampling at all
    assert resize_patch_grid(tokens, 16).dtype == torch.bfloat16  # interpolated in fp32, returned as given


def test_gram_loss_with_2x_teacher_resizes_to_student_grid() -> None:
    """Teacher at 2x resolution (8x8 tokens) vs student 4x4: loss == loss against the resized teacher."""
    torch.manual_seed(9)
    student, teacher = torch.randn(2, 16, 5), torch.randn(2, 64, 5)
    resized = torch.from_numpy(
        np.stack([
            np.stack([_bicubic_resize_reference(teacher[b, :, c].double().numpy().reshape(8, 8), 4).reshape(-1)
                      for c in range(5)], axis=-1)
            for b in range(2)
        ])
    ).float()
    assert gram_loss(student, teacher).item() == pytest.approx(
        _gram_reference(student.numpy(), resized.numpy(), True, True, False), rel=1e-4
    )
    # a smooth feature field sampled at 2x resolution gives (near) the same Gram matrix as at 1x
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij")
    field = torch.stack([torch.sin(3 * xs) + 2, torch.cos(2 * ys) + 2, xs * ys + 1], dim=-1).reshape(1, 64, 3)
    coarse = resize_patch_grid(field, 16)
    assert gram_loss(coarse, field).item() < 1e-6
    with pytest.raises(ValueError, match="square"):
        gram_loss(student, torch.randn(2, 60, 5))
