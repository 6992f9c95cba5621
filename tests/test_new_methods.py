"""CART, Iso-CTS, singular value calibration (SVC) and lors_centred: each primitive against
a naive float64 reference written from the papers' formulas, and their properties. Their
configuration, CLI and engine/search agreement: test_new_methods_wiring.py."""

from __future__ import annotations

import pytest
import torch

from lors.merging import core, validate_config
from lors.merging import primitives as P
from lors.merging.config import resolve, resolve_method

FFN = "model.encoder.layers.0.fc1.weight"


def random_taus(count: int, m: int = 24, n: int = 40, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g) for _ in range(count)]


def params(**given) -> dict:
    return {"lambda": 1.0, "seed": 0, "svd": "exact", "svd_oversample": 10, "svd_niter": 2,
            **given}


def delta(op: str, taus, weights=None, **given) -> torch.Tensor:
    """What `lors merge` adds to an FFN matrix for ``op`` (the engine's core)."""
    weights = [1.0] * len(taus) if weights is None else weights
    out, _ = core.merged_delta(core.PlanEntry(FFN, "ffn", op), taus, weights, params(**given))
    return out


# ---------------------------------------------------------------- references (float64 loops)

def cart_reference(taus, rank: int, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i LowRank_k(tau_i - mean), mean), mean = sum w_i tau_i / sum w_i."""
    xs = [t.double() for t in taus]
    mean = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
    low_rank = torch.zeros_like(mean)
    for w, x in zip(weights, xs):
        u, s, vh = torch.linalg.svd(x - mean)
        for j in range(rank):
            low_rank += w * s[j] * torch.outer(u[:, j], vh[j])
    return low_rank, mean


def polar(x: torch.Tensor) -> torch.Tensor:
    """x (x^T x)^(-1/2): the orthonormal polar factor, here through an eigendecomposition."""
    values, vectors = torch.linalg.eigh(x.T @ x)
    return x @ (vectors * values.rsqrt()) @ vectors.T


def iso_cts_reference(taus, k: int, per_task: int) -> torch.Tensor:
    xs = [t.double() for t in taus]
    u, s, vh = torch.linalg.svd(sum(xs))
    left = [u[:, j] for j in range(k)]
    right = [vh[j] for j in range(k)]
    sigmas = [float(s[j]) for j in range(k)]
    for x in xs:
        residual = x.clone()
        for j in range(k):  # remove the common subspace, one direction at a time
            residual -= torch.outer(u[:, j], u[:, j] @ x)
        p, e, qh = torch.linalg.svd(residual)
        for j in range(per_task):
            left.append(p[:, j])
            right.append(qh[j])
            sigmas.append(float(e[j]))
    sigma = sum(sigmas) / len(sigmas)
    return sigma * polar(torch.stack(left, dim=1)) @ polar(torch.stack(right, dim=1)).T


def svc_reference(merged, taus, alpha: float) -> torch.Tensor:
    merged = merged.double()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    out = torch.zeros_like(merged)
    for r in range(len(s)):
        response = u[:, r] @ merged
        total = 0.0
        for tau in taus:
            own = u[:, r] @ tau.double()
            norm = float(own @ own)
            # a response under 1e-4 of the merged one (zero included) does not count
            acts = norm ** 0.5 > 1e-4 * float(response @ response) ** 0.5
            coefficient = float(response @ own) / norm if acts else 0.0
            total += max(alpha, coefficient)
        out += (len(taus) / total) * s[r] * torch.outer(u[:, r], vh[r])
    return out


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> bool:
    return torch.allclose(actual.double(), expected.double(), atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------------ CART

@pytest.mark.parametrize("rank,weights", [(1, [1.0, 1.0, 1.0]), (5, [1.0, 1.0, 1.0]),
                                          (3, [0.5, 2.0, 1.0])])
def test_cart_combine_matches_reference(rank, weights):
    taus = random_taus(3)
    low_rank, mean = P.cart_combine(taus, rank, weights, exact=True)
    expected_low, expected_mean = cart_reference(taus, rank, weights)
    assert close(mean, expected_mean) and close(low_rank, expected_low)


def test_cart_op_is_mean_plus_lambda_times_low_rank_sum():
    taus = random_taus(3, seed=1)
    low_rank, mean = cart_reference(taus, 4, [1.0] * 3)
    for lam in (0.0, 0.6, 1.5):
        assert close(delta("cart", taus, rank=4, **{"lambda": lam}), mean + lam * low_rank)


def test_cart_rank_ratio_and_defaults():
    config = validate_config({"method": "cart", "experts": [{"name": "a", "path": "x"},
                                                             {"name": "b", "path": "y"}]})
    _, resolved, ops = resolve(config)
    assert resolved["rank_ratio"] == 0.08 and "rank" not in resolved
    assert resolved["lambda"] == 1.0 and ops["ffn"] == "cart" and ops["bias"] == "average"
    _, resolved, _ = resolve_method("cart", {"rank": 3}, {}, [1.0, 1.0])
    assert resolved["rank"] == 3 and "rank_ratio" not in resolved  # a given rank wins
    taus = random_taus(3, m=20, n=50, seed=2)  # rank_ratio 0.2 of 20 -> rank 4
    assert close(delta("cart", taus, rank_ratio=0.2), delta("cart", taus, rank=4))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cart_one_or_identical_experts_give_that_expert_for_any_lambda(svd):
    tau = random_taus(1, seed=3)[0]
    for lam in (0.3, 2.0):
        assert close(delta("cart", [tau], [1.0], rank=3, svd=svd, **{"lambda": lam}), tau)
        assert close(delta("cart", [tau.clone() for _ in range(3)], rank=3, svd=svd,
                           **{"lambda": lam}), tau)


def test_cart_at_full_rank_is_the_weighted_average_for_any_lambda():
    # the centred task vectors sum to zero: nothing is left when none of them is truncated
    taus = random_taus(3, seed=4)
    weights = [1.0, 3.0, 0.5]
    average = sum(w * t for w, t in zip(weights, taus)) / sum(weights)
    for lam in (0.5, 2.0):
        assert close(delta("cart", taus, weights, rank=24, **{"lambda": lam}), average)


def test_cart_does_not_reuse_another_ops_cached_factors():
    """The search shares one SVD cache across methods: CART's centred matrices must not be
    served the factors lors cached for the raw task vectors of the same tensor."""
    taus = random_taus(3, seed=5)
    entry = core.PlanEntry(FFN, "ffn", "lors")
    for svd in ("exact", "randomized"):
        cache: dict = {}
        core.combine(entry, taus, [1.0] * 3, params(rank=3, keep=0.2, svd=svd), svd_cache=cache)
        cached, _ = core.combine(core.PlanEntry(FFN, "ffn", "cart"), taus, [1.0] * 3,
                                 params(rank=3, svd=svd), svd_cache=cache)
        fresh, _ = core.combine(core.PlanEntry(FFN, "ffn", "cart"), taus, [1.0] * 3,
                                params(rank=3, svd=svd))
        assert torch.equal(cached.scaled, fresh.scaled) and torch.equal(cached.fixed, fresh.fixed)


# --------------------------------------------------------------------------------- Iso-CTS

@pytest.mark.parametrize("rank,experts,ratio,expected", [
    (32, 3, 0.8, (26, 2)), (10, 4, 0.5, (6, 1)), (10, 3, 0.0, (1, 3)), (3, 2, 0.0, (1, 1)),
    (5, 2, 0.5, (1, 2)), (4, 3, 1.0, (4, 0)), (6, 4, 0.5, (2, 1)), (2, 3, 0.0, (2, 0))])
def test_iso_cts_split_by_hand(rank, experts, ratio, expected):
    k, per_task = P.iso_cts_split(rank, experts, ratio)
    assert (k, per_task) == expected and k + experts * per_task == rank and k >= 0


@pytest.mark.parametrize("ratio,experts", [(0.8, 3), (0.5, 3), (0.3, 4), (0.0, 2)])
def test_iso_cts_combine_matches_reference(ratio, experts):
    taus = random_taus(experts, seed=6)
    k, per_task = P.iso_cts_split(24, experts, ratio)
    assert close(P.iso_cts_combine(taus, ratio), iso_cts_reference(taus, k, per_task))


def test_iso_cts_op_weights_the_task_matrices_and_scales_by_lambda():
    taus = random_taus(3, seed=7)
    weights = [1.0, 0.5, 2.0]
    expected = 0.7 * P.iso_cts_combine([w * t for w, t in zip(weights, taus)], 0.6)
    assert close(delta("iso_cts", taus, weights, common_ratio=0.6, **{"lambda": 0.7}), expected)
    config = validate_config({"method": "iso_cts", "experts": [{"name": "a", "path": "x"}]})
    _, resolved, ops = resolve(config)
    assert resolved["common_ratio"] == 0.8 and resolved["lambda"] == 1.0
    assert ops["ffn"] == "iso_cts" and ops["layer_norm"] == "average"


def test_svds_that_fail_in_float32_are_recomputed_in_float64(monkeypatch):
    # LAPACK's float32 SVD failed to converge on real experts' Iso-CTS directions; make every
    # float32 SVD fail so that each method must go through the float64 retry
    svd = torch.linalg.svd

    def float32_fails(x, *args, **kwargs):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(x, *args, **kwargs)

    taus = random_taus(3, seed=9)
    expected = {"iso_cts": P.iso_cts_combine(taus, 0.6), "tsv": P.tsv_combine(taus),
                "iso_c": P.iso_c_combine(sum(taus))}
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    got = {"iso_cts": P.iso_cts_combine(taus, 0.6), "tsv": P.tsv_combine(taus),
           "iso_c": P.iso_c_combine(sum(taus))}
    for name, merged in got.items():
        assert merged.dtype == torch.float32, name
        assert close(merged, expected[name]), name
    with pytest.raises(torch.linalg.LinAlgError):  # float64 failing too is not hidden
        monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(
            torch.linalg.LinAlgError("no convergence")))
        P.thin_svd(taus[0])


def test_iso_cts_reduces_to_iso_c():
    taus = random_taus(3, seed=8)
    # common_ratio 1: no task-specific directions, the whole spectrum of the sum is flattened
    assert close(P.iso_cts_combine(taus, 1.0), P.iso_c_combine(sum(taus)))
    # one expert: its residual directions are its own lower singular vectors
    assert close(P.iso_cts_combine(taus[:1], 0.5), P.iso_c_combine(taus[0]))


def test_iso_cts_spectrum_is_flat():
    out = P.iso_cts_combine(random_taus(4, seed=9), 0.8)
    s = torch.linalg.svdvals(out)
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-4)


# ------------------------------------------------------------------------------------- SVC

@pytest.mark.parametrize("alpha,lam", [(0.1, 0.4), (0.5, 0.4), (1.0, 1.0), (0.2, -0.3)])
def test_svc_matches_reference(alpha, lam):
    taus = random_taus(3, seed=10)
    merged = lam * sum(taus)
    assert close(P.svc_calibrate(merged, taus, alpha), svc_reference(merged, taus, alpha))
    ties = delta("ties", taus, keep=0.3)  # any merge can be calibrated
    assert close(P.svc_calibrate(ties, taus, alpha), svc_reference(ties, taus, alpha))


def test_svc_zero_response_counts_as_alpha():
    # two tasks on disjoint blocks (rows 0-1 x columns 0-2, rows 2-3 x columns 3-5): along
    # each task's singular directions the other's response is zero (up to rounding), so it
    # counts as alpha (s = 0 clipped up) and gamma = 2 / (1 + alpha) everywhere
    a, b = torch.zeros(4, 6), torch.zeros(4, 6)
    g = torch.Generator().manual_seed(13)
    a[:2, :3], b[2:, 3:] = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for noise in (0.0, 1e-7, -1e-7):  # a rounding-level response does not count either
        b[:2, :3] = noise * torch.randn(2, 3, generator=g)
        merged = a + b
        calibrated = P.svc_calibrate(merged, [a, b], 0.25)
        assert close(calibrated, svc_reference(merged, [a, b], 0.25))
        assert close(calibrated, merged * 2 / (1 + 0.25))


def test_svc_properties():
    tau = random_taus(1, seed=11)[0]
    for alpha in (0.1, 1.0):  # one expert merged as itself: every s = 1, nothing changes
        assert close(P.svc_calibrate(tau, [tau], alpha), tau)
    for lam in (0.2, 0.5, 1.0):  # K identical experts summed: s = lambda K, undone exactly
        assert close(P.svc_calibrate(lam * 3 * tau, [tau] * 3, 0.3), tau)
    taus = random_taus(3, seed=12)
    merged = 0.3 * sum(taus)
    calibrated = torch.linalg.svdvals(P.svc_calibrate(merged, taus, 0.25))
    original = torch.linalg.svdvals(merged)
    assert (calibrated <= original / 0.25 + 1e-4).all() and (calibrated > 0).all()
    assert torch.count_nonzero(P.svc_calibrate(torch.zeros(5, 7), [torch.zeros(5, 7)], 0.5)) == 0


def test_zero_task_vectors_give_zero_delta():
    zeros = [torch.zeros(16, 24) for _ in range(3)]
    for op, given in (("cart", {"rank": 3}), ("iso_cts", {"common_ratio": 0.8})):
        assert torch.count_nonzero(delta(op, zeros, **given)) == 0



def test_lors_centred_against_a_loop_reference():
    """mean + lambda * sum_i LoRS(tau_i - mean), written out by hand in float64."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(24, 40, generator=g) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    pruned, mean = P.lors_centred_combine(taus, 3, 0.25, weights, exact=True)
    reference_mean = sum(w * t.double() for t, w in zip(taus, weights)) / sum(weights)
    reference = torch.zeros_like(reference_mean)
    for tau, w in zip(taus, weights):
        centred = tau.double() - reference_mean
        u, s, vh = torch.linalg.svd(centred, full_matrices=False)
        low = (u[:, :3] * s[:3]) @ vh[:3]
        residual = centred - low
        k = int(0.25 * residual.numel())
        threshold = residual.abs().flatten().kthvalue(residual.numel() - k + 1).values
        reference += w * (low + residual * (residual.abs() >= threshold))
    torch.testing.assert_close(mean.double(), reference_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pruned.double(), reference, rtol=1e-4, atol=1e-4)


def test_lors_centred_of_identical_experts_is_that_expert():
    tau = torch.randn(16, 24)
    pruned, mean = P.lors_centred_combine([tau.clone() for _ in range(3)], 4, 0.2, exact=True)
    assert pruned.abs().max() < 1e-5 and torch.allclose(mean, tau, atol=1e-6)
