"""Each primitive against a straightforward reference (full SVD, full sort) or PEFT's utilities."""

import pytest
import torch
from peft.utils import merge_utils as peft

from lors.merging import primitives as P
from lors.merging.global_topk import GlobalThreshold


def decaying(m: int, n: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    """A random matrix with singular values 1/i**decay (like real fine-tuning deltas)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = 1.0 / torch.arange(1, min(m, n) + 1).float() ** decay
    return (u * s) @ v.T


@pytest.mark.parametrize("n,k", [(1000, 1), (1000, 200), (300_000, 60_000), (300_000, 1)])
def test_kth_largest_magnitude_matches_sort(n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + k))
    expected = torch.sort(x.abs(), descending=True).values[k - 1]
    assert P.kth_largest_magnitude(x, k) == expected
    assert torch.equal(x, torch.randn(n, generator=torch.Generator().manual_seed(n + k)))


def test_kth_largest_magnitude_with_ties_signed_zeros_inf_and_nan():
    x = torch.cat([torch.zeros(200_000), -torch.zeros(1000), torch.ones(100_000),
                   -torch.arange(1000.0), torch.tensor([float("inf"), -float("inf")]),
                   torch.tensor([float("nan")])])
    ordered = torch.sort(x.abs(), descending=True).values  # NaN first, as the largest
    assert torch.isnan(P.kth_largest_magnitude(x, 1))
    for k in (2, 3, 4, 500, 1003, 50_000, 250_000, x.numel()):
        assert P.kth_largest_magnitude(x, k) == ordered[k - 1], k
    with pytest.raises(ValueError):
        P.kth_largest_magnitude(x, 0)


@pytest.mark.parametrize("threshold", [0.0, 1e-45, 0.7, 1.0, float("inf"), float("-inf"),
                                       float("nan")])
def test_keep_at_least_equals_the_masked_product(threshold):
    """The one-pass cut (hardshrink just below the threshold) against x * (|x| >= t), on
    values that sit exactly on the threshold, signed zeros, subnormals, inf and NaN."""
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 0.7, -0.7, 0.69999999, 1.0, -1.0, 2.0,
                      float("inf"), -float("inf"), float("nan")])
    x = torch.cat([x, torch.randn(1000, generator=torch.Generator().manual_seed(5))])
    cut = torch.tensor(threshold)
    expected = x * (x.abs() >= cut)
    for got in (P.keep_at_least(x, cut), P.keep_at_least(x, threshold),
                P.keep_at_least(x.clone(), cut, out=torch.empty_like(x))):
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    inplace = x.clone()
    assert P.keep_at_least(inplace, cut, out=inplace) is inplace


def test_magnitude_mask_keeps_exactly_floor_keep_numel():
    x = torch.randn(77, 91)
    mask = P.magnitude_mask(x, 0.2)
    assert int(mask.sum()) == int(0.2 * x.numel())
    assert x.abs()[mask].min() >= x.abs()[~mask].max()
    assert not P.magnitude_mask(x, 0.0).any() and P.magnitude_mask(x, 1.0).all()


def test_magnitude_prune_matches_peft():
    x = torch.randn(64, 48)
    assert torch.equal(P.magnitude_prune(x, 0.3), peft.magnitude_based_pruning(x, 0.3))


@pytest.mark.parametrize("shape", [(96, 64), (64, 200)])
def test_exact_truncated_svd_is_best_rank_r(shape):
    x = torch.randn(*shape, dtype=torch.float64).float()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    reference = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(P.low_rank_approx(x, 5, exact=True), reference, atol=1e-5)


@pytest.mark.parametrize("decay", [0.3, 0.5, 1.0])
def test_randomized_svd_error_within_stated_bound(decay):
    # Stated bound: with the default sketch (p = 10, 2 power iterations) the rank-7 part's
    # error ||x - L|| is within 0.2% of the optimum, and always within the HMT factor.
    x = decaying(256, 768, seed=1, decay=decay)
    exact = P.low_rank_approx(x, 7, exact=True)
    approx = P.low_rank_approx(x, 7, generator=torch.Generator().manual_seed(0))
    optimum = torch.linalg.norm(x - exact)
    assert torch.linalg.norm(x - approx) <= 1.002 * optimum
    assert torch.linalg.norm(x - approx) <= (1 + 7 / (10 - 1)) ** 0.5 * optimum


def test_randomized_svd_factors_are_consistent():
    x = decaying(120, 300, seed=2)
    u, s, vh = P.truncated_svd(x, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(u.T @ u, torch.eye(5), atol=1e-4)
    assert torch.allclose(vh @ vh.T, torch.eye(5), atol=1e-4)
    assert torch.allclose(s, torch.linalg.svdvals(x)[:5], rtol=1e-3)
    assert P.truncated_svd(torch.zeros(10, 20), 3)[1].abs().max() == 0


def lors_reference(x: torch.Tensor, rank: int, keep: float) -> torch.Tensor:
    """LoRS written the straightforward way: full SVD, then sort-based top-k of the residual."""
    u, s, vh = torch.linalg.svd(x, full_matrices=True)
    low = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank, :]
    residual = x - low
    k = int(keep * x.numel())
    order = torch.argsort(residual.abs().reshape(-1), descending=True)
    kept = torch.zeros(x.numel())
    kept[order[:k]] = residual.reshape(-1)[order[:k]]
    return low + kept.reshape(x.shape)


def test_lors_exact_equals_full_svd_reference():
    x = decaying(128, 192, seed=3, decay=0.5)
    ours = P.lors_prune(x, 7, 0.2, exact=True)
    assert torch.allclose(ours, lors_reference(x, 7, 0.2), atol=1e-5)


@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_lors_randomized_prunes_as_well_as_full_svd_reference(decay):
    # Near-equal singular values make the rank-7 subspace (and so individual entries)
    # ill-determined; what must hold is that the randomized LoRS discards no more of the task
    # vector than the exact one, within 0.2%.
    x = decaying(256, 512, seed=4, decay=decay)
    ours = P.lors_prune(x, 7, 0.2, generator=torch.Generator().manual_seed(0))
    reference = lors_reference(x, 7, 0.2)
    assert torch.linalg.norm(x - ours) <= 1.002 * torch.linalg.norm(x - reference)
    assert int(torch.count_nonzero(ours - P.low_rank_approx(x, 7, generator=torch.Generator().manual_seed(0)))) <= int(0.2 * x.numel()) + 1


def test_dare_drop_matches_peft_with_same_seed():
    x = torch.randn(40, 30)
    torch.manual_seed(123)
    expected = peft.random_pruning(x, density=0.3, rescale=True)
    ours = P.dare_drop(x, 0.3, torch.Generator().manual_seed(123))
    assert torch.allclose(ours, expected)


def test_dare_drop_statistics():
    x = torch.ones(200_000)
    dropped = P.dare_drop(x, 0.25, torch.Generator().manual_seed(0))
    assert abs(float((dropped != 0).float().mean()) - 0.25) < 0.01
    assert torch.allclose(dropped[dropped != 0], torch.tensor(4.0))


def test_ties_elect_and_disjoint_mean_match_peft():
    stacked = torch.randn(4, 50, 20)
    trimmed = torch.stack([peft.magnitude_based_pruning(t, 0.3) for t in stacked])
    sign = P.elect_sign(trimmed)
    expected = peft.disjoint_merge(trimmed, peft.calculate_majority_sign_mask(trimmed, "total"))
    assert torch.allclose(P.disjoint_mean(trimmed, sign), expected)


def test_disjoint_mean_by_hand():
    stacked = torch.tensor([[2.0, -1.0, 0.0], [4.0, 3.0, 0.0], [-3.0, -4.0, 0.0]])
    sign = P.elect_sign(stacked)  # sums 3, -2, 0 -> +1, -1, +1
    assert sign.tolist() == [1.0, -1.0, 1.0]
    assert P.disjoint_mean(stacked, sign).tolist() == [3.0, -2.5, 0.0]


def test_orthogonalise_gives_orthonormal_columns():
    q = P.orthogonalise(torch.randn(50, 12))
    assert torch.allclose(q.T @ q, torch.eye(12), atol=1e-5)


def test_tsv_combine_by_reference():
    mats = [torch.randn(24, 36) for _ in range(3)]
    k = 24 // 3
    svds = [torch.linalg.svd(m, full_matrices=False) for m in mats]
    u = torch.cat([s[0][:, :k] for s in svds], 1)
    v = torch.cat([s[2][:k].T for s in svds], 1)
    sig = torch.cat([s[1][:k] for s in svds])
    pu, _, qu = torch.linalg.svd(u, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v, full_matrices=False)
    expected = (pu @ qu) @ torch.diag(sig) @ (pv @ qv).T
    assert torch.allclose(P.tsv_combine(mats), expected, atol=1e-5)


def test_tsv_single_task_full_rank_is_identity():
    m = torch.randn(20, 30)
    assert torch.allclose(P.tsv_combine([m]), m, atol=1e-4)


def test_iso_c_has_flat_spectrum_and_same_singular_vectors():
    m = torch.randn(30, 40)
    out = P.iso_c_combine(m)
    s_out = torch.linalg.svdvals(out)
    assert torch.allclose(s_out, torch.full_like(s_out, float(torch.linalg.svdvals(m).mean())),
                          atol=1e-4)


@pytest.mark.parametrize("keep", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_global_threshold_matches_sort(keep):
    tensors = [torch.randn(1000) * s for s in (0.5, 1.0, 3.0)] + [torch.zeros(100)]
    acc = GlobalThreshold()
    for t in tensors:
        acc.first_pass(t)
    acc.choose_bucket(keep)
    for t in tensors:
        acc.second_pass(t)
    everything = torch.cat(tensors).abs()
    k = int(keep * everything.numel())
    kept = int((everything >= acc.value()).sum())
    assert kept == k
