"""Whole per-tensor ops: against PEFT's merge utilities, straightforward references, properties."""

import pytest
import torch
from peft.utils import merge_utils as peft

from lors.merging import primitives as P
from lors.merging.config import resolve, validate_config
from lors.merging.methods import METHODS, OPS, OpContext


def context(params: dict, weights=(1.0, 1.0, 1.0), name="model.encoder.layers.0.fc1.weight",
            seed: int = 0) -> OpContext:
    full = {"lambda": 1.0, "rank": 4, "keep": 0.2, "svd": "exact", "svd_oversample": 10,
            "svd_niter": 2, "dare_combine": "linear", "seed": seed, **params}
    return OpContext(name, list(weights), full, lambda i: torch.Generator().manual_seed(seed + i))


def run_op(op: str, taus, ctx: OpContext) -> torch.Tensor:
    """The op's delta as the core scales it: lambda * combination (or the combination)."""
    return OPS[op].combine(taus, ctx) * (ctx.params["lambda"] if OPS[op].lambda_scaled else 1)


@pytest.fixture
def taus():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(32, 48, generator=g) for _ in range(3)]


def test_task_arithmetic_matches_peft(taus):
    weights = torch.tensor([0.5, 1.0, 2.0])
    ours = run_op("task_arithmetic", taus, context({}, weights.tolist()))
    assert torch.allclose(ours, peft.task_arithmetic(taus, weights), atol=1e-6)


def test_ties_matches_peft_with_equal_weights(taus):
    # PEFT elects the sign on unweighted values; lors on weighted ones (an expert's weight is
    # its say in the election, as in mergekit). With equal weights the two agree exactly.
    weights = torch.ones(3)
    ours = run_op("ties", taus, context({"keep": 0.3}, weights.tolist()))
    assert torch.allclose(ours, peft.ties(taus, weights, 0.3, "total"), atol=1e-6)


def test_ties_weighted_by_reference(taus):
    weights = [1.0, 0.2, 3.0]
    ours = run_op("ties", taus, context({"keep": 0.3, "lambda": 0.5}, weights))
    trimmed = torch.stack([w * peft.magnitude_based_pruning(t, 0.3) for t, w in zip(taus, weights)])
    expected = torch.zeros_like(taus[0])
    for idx in range(expected.numel()):
        column = trimmed.reshape(3, -1)[:, idx]
        sign = 1.0 if column.sum() >= 0 else -1.0
        agreeing = [float(v) for v in column if v != 0 and (v > 0) == (sign > 0)]
        expected.view(-1)[idx] = 0.5 * (sum(agreeing) / len(agreeing) if agreeing else 0.0)
    assert torch.allclose(ours, expected, atol=1e-5)


def test_magnitude_matches_peft(taus):
    weights = torch.tensor([1.0, 2.0, 0.5])
    ours = run_op("magnitude", taus, context({"keep": 0.4}, weights.tolist()))
    assert torch.allclose(ours, peft.magnitude_prune(taus, weights, 0.4), atol=1e-6)


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_matches_peft_with_the_same_random_stream(combine):
    # PEFT draws every expert's mask from the global generator in turn; give ours the same
    # stream by seeding one generator and handing it to every expert.
    taus = [torch.randn(20, 30) for _ in range(3)]
    weights = torch.tensor([1.0, 0.5, 1.5] if combine == "linear" else [1.0, 1.0, 1.0])
    torch.manual_seed(99)
    expected = (peft.dare_linear(taus, weights, 0.4) if combine == "linear"
                else peft.dare_ties(taus, weights, 0.4, "total"))
    shared = torch.Generator().manual_seed(99)
    ctx = context({"keep": 0.4, "dare_combine": combine}, weights.tolist())
    ctx.generator_for = lambda i: shared
    assert torch.allclose(run_op("dare", taus, ctx), expected, atol=1e-6)


def test_average_is_weighted_mean(taus):
    out = run_op("average", taus, context({}, [1.0, 1.0, 2.0]))
    assert torch.allclose(out, (taus[0] + taus[1] + 2 * taus[2]) / 4, atol=1e-6)


def test_lors_op_sums_pruned_task_vectors(taus):
    out = run_op("lors", taus, context({"lambda": 0.5, "rank": 3, "keep": 0.25}))
    expected = 0.5 * sum(P.lors_prune(t, 3, 0.25, exact=True) for t in taus)
    assert torch.allclose(out, expected, atol=1e-5)


def test_svd_op_is_low_rank_task_arithmetic(taus):
    out = run_op("svd", taus, context({"rank": 2, "lambda": 0.3}))
    expected = sum(0.3 * P.low_rank_approx(t, 2, exact=True) for t in taus)
    assert torch.allclose(out, expected, atol=1e-5)
    assert int(torch.linalg.matrix_rank(out)) <= 6


def test_iso_c_op_uses_summed_task_matrix(taus):
    out = run_op("iso_c", taus, context({"lambda": 1.0}))
    assert torch.allclose(out, P.iso_c_combine(taus[0] + taus[1] + taus[2]), atol=1e-5)


MATRIX_METHODS = ["lors", "task_arithmetic", "ties", "dare", "magnitude", "svd", "average"]


@pytest.mark.parametrize("method", MATRIX_METHODS + ["tsv", "iso_c"])
def test_zero_task_vectors_give_zero_delta(method):
    zeros = [torch.zeros(16, 24) for _ in range(3)]
    out = run_op(METHODS[method].matrix_op, zeros, context({}))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("method", ["lors", "task_arithmetic", "ties", "magnitude", "svd",
                                    "average", "dare"])
def test_one_expert_lambda_one_full_keep_gives_that_expert(method):
    tau = torch.randn(16, 24)
    params = {"lambda": 1.0, "keep": 1.0, "rank": 16}
    out = run_op(METHODS[method].matrix_op, [tau], context(params, [1.0]))
    assert torch.allclose(out, tau, atol=1e-5)


def test_tsv_one_expert_full_rank_gives_that_expert():
    tau = torch.randn(16, 24)
    assert torch.allclose(run_op("tsv", [tau], context({}, [1.0])), tau, atol=1e-4)


@pytest.mark.parametrize("method,sums", [("task_arithmetic", True), ("magnitude", True),
                                          ("ties", False), ("average", False)])
def test_identical_experts(method, sums):
    # Sum-based methods with lambda = 1/T, and mean-based ones with any lambda, reproduce the
    # single expert.
    tau = torch.randn(16, 24)
    ctx = context({"lambda": 1.0 / 3 if sums else 1.0, "keep": 0.3})
    out = run_op(METHODS[method].matrix_op, [tau.clone() for _ in range(3)], ctx)
    single = run_op(METHODS[method].matrix_op, [tau], context({"lambda": 1.0, "keep": 0.3}, [1.0]))
    assert torch.allclose(out, single, atol=1e-5)


def test_identical_experts_lors_equals_single_expert_pruning():
    tau = torch.randn(16, 24)
    out = run_op("lors", [tau.clone() for _ in range(4)], context({"lambda": 0.25}, [1.0] * 4))
    assert torch.allclose(out, P.lors_prune(tau, 4, 0.2, exact=True), atol=1e-5)


def test_resolve_fills_defaults_and_one_over_t_lambda():
    config = validate_config({"experts": [{"name": str(i), "path": "x"} for i in range(5)],
                              "method": "lors"})
    method, params, ops = resolve(config)
    assert (method, params["rank"], params["keep"], params["lambda"]) == ("lors", 7, 0.2, 0.2)
    assert ops["ffn"] == "lors" and ops["layer_norm"] == "task_arithmetic"


def test_diagnostics_gram_and_sign_conflicts_by_hand():
    from lors.merging.diagnostics import gram, sign_conflict_rate
    taus = [torch.randn(700_000) for _ in range(3)]
    expected = torch.tensor([[float(torch.dot(a.double(), b.double())) for b in taus] for a in taus],
                            dtype=torch.float64)
    assert torch.allclose(gram(taus), expected, rtol=1e-5)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0])
    b = torch.tensor([1.0, 1.0, 3.0, -2.0])
    # entries nonzero in both: 0, 1, 3; signs disagree at 1 and 3
    assert sign_conflict_rate([a, b]) == pytest.approx(2 / 3)
