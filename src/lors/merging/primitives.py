"""Pure tensor functions that every merge method is built from.

Each takes and returns float32 tensors and states its exact semantics. None of them touches
files, names or configuration: that is the engine's business.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def kth_largest_magnitude(x: Tensor, k: int, *, scratch: Tensor | None = None) -> Tensor:
    """The k-th largest |value| of ``x`` (any shape), 1 <= k <= numel, as a 0-d tensor of
    ``x``'s dtype (NaN counts as the largest, as in a sort).

    Exact, and never a full sort: on CPU in float32 an introselect (``numpy.partition``,
    linear time) of |x|'s IEEE-754 bit patterns read as int32, whose order is the order of
    non-negative floats (NaN above +inf) and which compare about 3x faster than floats;
    elsewhere ``torch.kthvalue``. One temporary of ``x``'s size (|x|, then reordered): new
    memory, or ``scratch`` (contiguous, of x's size and dtype; overwritten).
    """
    x = x.detach()
    magnitude = (x.abs() if scratch is None else torch.abs(x, out=scratch)).reshape(-1)
    n = magnitude.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    if magnitude.device.type == "cpu" and magnitude.dtype == torch.float32:
        keys = magnitude.numpy().view(np.int32)
        keys.partition(n - k)
        return torch.tensor(keys[n - k : n - k + 1].view(np.float32)[0])
    return magnitude.kthvalue(n - k + 1).values


def magnitude_threshold(x: Tensor, keep: float, *, scratch: Tensor | None = None) -> Tensor:
    """The cut of :func:`magnitude_mask`: the k-th largest |value| of ``x``, k =
    floor(keep * numel), as a 0-d tensor of ``x``'s dtype, so that the mask is
    ``magnitude_at_least(x, threshold)`` (|x| >= threshold). NaN when k <= 0 (no entry
    compares >= NaN: nothing is kept) and -inf when k >= numel (every entry but NaN is kept;
    a NaN entry of x stays NaN in the pruned tensor all the same, as in the mask product). Computed once for a whole tensor, it cuts any block
    of the tensor's entries exactly as the whole tensor's mask does. ``scratch``: see
    :func:`kth_largest_magnitude`.
    """
    k = int(keep * x.numel())
    if k <= 0 or k >= x.numel():
        return torch.tensor(float("nan") if k <= 0 else float("-inf"), dtype=x.dtype,
                            device=x.device)
    return kth_largest_magnitude(x, k, scratch=scratch)


def magnitude_mask(x: Tensor, keep: float) -> Tensor:
    """Boolean mask of the k = floor(keep * numel) entries of ``x`` with the largest |value|.

    Entries tied with the k-th largest magnitude are all kept (so exactly k when there are no
    ties); keep <= 0 keeps nothing, keep >= 1 keeps everything.
    """
    return magnitude_at_least(x, magnitude_threshold(x, keep))


def magnitude_at_least(x: Tensor, threshold: Tensor) -> Tensor:
    """Boolean mask |x| >= ``threshold`` (a 0-d tensor of ``x``'s dtype), in ``x``'s dtype."""
    magnitude = x.detach().abs()
    if magnitude.device.type == "cpu" and magnitude.dtype == torch.float32:
        # numpy's comparison is several times faster than torch's bool kernels on this CPU
        return torch.from_numpy(magnitude.numpy() >= threshold.numpy())
    return magnitude >= threshold


def keep_at_least(x: Tensor, threshold: Tensor | float, *, out: Tensor | None = None
                  ) -> Tensor:
    """``x * (|x| >= threshold)``: the entries with |value| below ``threshold`` (a 0-d tensor
    or a float, compared in ``x``'s dtype) set to zero, the others (NaN included) unchanged;
    into ``out`` when given (which may be ``x`` itself). A NaN threshold keeps nothing (x * 0).

    One pass, with no mask: ``torch.hardshrink`` zeroes |x| <= lambda, and with lambda the
    largest float below the threshold that is exactly |x| < threshold (no float lies between
    them). Zeroed entries are +0 where the product gives -0 for a negative entry: equal values.
    """
    cut = torch.as_tensor(threshold).detach().to("cpu", x.dtype)
    if torch.isnan(cut):
        return torch.mul(x, 0, out=out) if out is not None else x * 0
    below = float(torch.nextafter(cut, cut.new_tensor(float("-inf"))))
    return torch.hardshrink(x, below, out=out) if out is not None else torch.hardshrink(x, below)


def magnitude_prune(x: Tensor, keep: float) -> Tensor:
    """``x`` with all but its top-``keep`` fraction of entries by magnitude set to zero."""
    return keep_at_least(x, magnitude_threshold(x, keep))


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(x, full_matrices=False)``: U [m,r], S [r], Vh [r,n], r = min(m, n).

    LAPACK's divide-and-conquer SVD can fail to converge in float32 on an ill-conditioned
    matrix (seen on real Whisper experts: Iso-CTS's stacked task-specific directions of a
    cross-attention key projection, singular values 2.4 down to 1.5e-3); it is then recomputed
    in float64 and returned in x's dtype. Otherwise the result is exactly torch's.
    """
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def truncated_svd(x: Tensor, rank: int, *, exact: bool = False, oversample: int = 10,
                  niter: int = 2, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``rank`` singular triplets (U [m,r], S [r], Vh [r,n]) of a 2-D ``x``.

    ``exact`` uses a full ``torch.linalg.svd``. Otherwise a randomized range finder with a
    Gaussian sketch of q = rank + oversample columns and ``niter`` power iterations
    (Halko, Martinsson & Tropp 2011). Its error is bounded in expectation: with niter = 0,
    E||x - QQ^T x||_F <= sqrt(1 + rank / (oversample - 1)) * sqrt(sum_{j>rank} s_j^2), i.e.
    within a factor sqrt(1 + r/(p-1)) of the best rank-r error; each power iteration shrinks
    the excess further. Measured with the defaults (p = 10, 2 iterations) on 768 x 3072
    matrices with singular values 1/i^a, a in {0.3, 0.5, 1}: ||x - L|| exceeds the optimum by
    at most 0.06% (tests/test_primitives.py checks 0.1%). When q reaches min(m, n) the exact
    path is taken.
    """
    m, n = x.shape
    rank = max(0, min(rank, m, n))
    if rank == 0:
        return x.new_zeros(m, 0), x.new_zeros(0), x.new_zeros(0, n)
    sketch = rank + oversample
    if exact or sketch >= min(m, n):
        u, s, vh = thin_svd(x)
        return u[:, :rank], s[:rank], vh[:rank]
    # drawn where the generator lives (CPU for lors' seeded ones) and moved to x: the same
    # sketch, so the same factors up to rounding, on any device
    omega = torch.randn(n, sketch, generator=generator, dtype=x.dtype,
                        device=generator.device if generator is not None else x.device)
    omega = omega.to(x.device)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(niter):  # power iterations, re-orthonormalised each half step for stability
        # x^T q as (q^T x)^T: the same product, read along x's rows (up to 2x faster here)
        z, _ = torch.linalg.qr((q.T @ x).T)
        q, _ = torch.linalg.qr(x @ z)
    b = q.T @ x
    # SVD of the small q x n matrix b through the eigen-decomposition of b b^T (q x q, in
    # float64): much cheaper than an SVD of b, and exact to float32 precision for the top part.
    eigenvalues, w = torch.linalg.eigh((b.double() @ b.double().T))
    top = torch.argsort(eigenvalues, descending=True)[:rank]
    s = eigenvalues[top].clamp(min=0).sqrt()
    w = w[:, top]
    inverse = torch.where(s > s.max() * 1e-7, 1.0 / s, torch.zeros_like(s))
    vh = (inverse[:, None] * (w.T @ b.double())).to(x.dtype)
    return (q @ w.to(x.dtype)), s.to(x.dtype), vh


def low_rank_approx(x: Tensor, rank: int, **svd_options) -> Tensor:
    """Rank-``rank`` truncation U_r diag(S_r) V_r^T of a 2-D ``x`` (the "svd" ablation)."""
    u, s, vh = truncated_svd(x, rank, **svd_options)
    return (u * s) @ vh


def lors_prune(x: Tensor, rank: int, keep: float, *,
               factors: tuple[Tensor, Tensor, Tensor] | None = None, out: Tensor | None = None,
               scratch: Tensor | None = None, **svd_options) -> Tensor:
    """LoRS-Merging's pruned task vector of one matrix: L + top-k(R).

    L = rank-``rank`` truncation U_r diag(S_r) V_r^T of ``x`` (``factors``, when given, are
    those top-``rank`` triplets, e.g. from a cache; else :func:`truncated_svd` with
    ``svd_options``); R = x - L; the k = floor(keep * numel) entries of R with the largest
    |value| are kept (ties with the k-th all kept) and the rest zeroed; no sign election, no
    rescaling. ``x`` is not modified. The result is written into ``out`` when given, and
    ``scratch`` holds the top-k's temporary (both contiguous, of x's shape and dtype: memory
    the caller reuses rather than new pages).
    """
    u, s, vh = factors if factors is not None else truncated_svd(x, rank, **svd_options)
    scaled_u = u * s
    residual = (torch.addmm(x, scaled_u, vh, alpha=-1.0) if out is None  # x - L in one pass
                else torch.addmm(x, scaled_u, vh, alpha=-1.0, out=out))
    # R_kept + L, in the residual's memory, with L never materialised on its own
    cut = magnitude_threshold(residual, keep, scratch=scratch)
    return keep_at_least(residual, cut, out=residual).addmm_(scaled_u, vh)


def dare_drop(x: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry independently with probability ``keep``, rescale survivors by 1/keep."""
    if keep >= 1.0:
        return x.clone()
    if keep <= 0.0:
        return torch.zeros_like(x)
    # drawn where the generator lives and moved to x: the same mask on any device
    where = generator.device if generator is not None else x.device
    survivors = torch.bernoulli(torch.full(x.shape, keep, dtype=x.dtype, device=where),
                                generator=generator).to(x.device)
    return x * survivors / keep


def elect_sign(stacked: Tensor) -> Tensor:
    """TIES sign election by mass: +1 where the sum over experts (dim 0) is >= 0, else -1."""
    # in place on the sum: 1.0 / 0.0, then +1 / -1 (a NaN sum is -1, as in the comparison);
    # several times faster than torch.where with scalars
    return stacked.sum(dim=0).ge_(0).mul_(2).sub_(1)


def disjoint_mean(stacked: Tensor, sign: Tensor, inplace: bool = False) -> Tensor:
    """Mean over experts (dim 0) of only the entries whose sign equals ``sign`` (+1 or -1
    per entry, :func:`elect_sign`).

    Zero entries never count; where no expert agrees the result is 0. ``inplace`` zeroes
    the disagreeing entries of ``stacked`` itself instead of a copy's (the same result).
    One expert at a time, so no temporary as large as ``stacked`` is made (a whole-stack
    mask would be cast to float for the product and to int64 for the count).
    """
    masked = stacked if inplace else stacked.clone()
    count = torch.zeros(sign.shape, dtype=stacked.dtype, device=stacked.device)  # exact
    agrees = torch.empty_like(sign)
    for row in masked:
        # row * sign > 0 exactly where the row is nonzero with the elected sign (sign is +1
        # or -1; a zero or NaN entry agrees with neither), as 1.0 / 0.0: one float mask for
        # both the product (NaN * 0 stays NaN, as a mask product) and the count
        torch.mul(row, sign, out=agrees).gt_(0)
        row.mul_(agrees)
        count.add_(agrees)
    return masked.sum(dim=0).div_(count.clamp_(min=1))


def weighted_sum(stacked: Tensor, weights: Sequence[float]) -> Tensor:
    """sum_i weights[i] * stacked[i] over dim 0."""
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(dim=0)


def orthogonalise(x: Tensor) -> Tensor:
    """The nearest matrix with orthonormal columns (Procrustes): P Q^T where x = P S Q^T."""
    p, _, qh = thin_svd(x)
    return p @ qh


def tsv_combine(task_matrices: Sequence[Tensor]) -> Tensor:
    """TSV-Merge of T task matrices of one layer (Gargiulo et al. 2025).

    Each task keeps its top k = max(1, floor(min(m, n) / T)) singular triplets; the U and V
    blocks are concatenated, each orthogonalised (Procrustes), and the layer is rebuilt as
    U_perp diag(S_cat) V_perp^T.
    """
    count = len(task_matrices)
    m, n = task_matrices[0].shape
    k = max(1, min(m, n) // count)
    us, ss, vs = [], [], []
    for matrix in task_matrices:
        u, s, vh = thin_svd(matrix)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u_perp = orthogonalise(torch.cat(us, dim=1))
    v_perp = orthogonalise(torch.cat(vs, dim=1))
    return (u_perp * torch.cat(ss)) @ v_perp.T


def iso_c_combine(summed: Tensor) -> Tensor:
    """Iso-C (Marczak et al. 2025): U diag(mean(S)) V^T of the summed task matrix.

    Every singular value of sum_i tau_i is replaced by their mean (an isotropic spectrum).
    """
    u, s, vh = thin_svd(summed)
    return (u * s.mean()) @ vh


Factors = Callable[[int, Tensor], tuple[Tensor, Tensor, Tensor]]


def weighted_mean(task_matrices: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_i w_i tau_i / sum_i w_i, a new tensor (the inputs are not modified)."""
    mean = torch.zeros_like(task_matrices[0])
    for tau, weight in zip(task_matrices, weights):
        mean.add_(tau, alpha=weight)
    return mean.div_(sum(weights))


def lors_centred_combine(task_matrices: Sequence[Tensor], rank: int, keep: float,
                         weights: Sequence[float] | None = None, *,
                         factors: Factors | None = None, **svd_options) -> tuple[Tensor, Tensor]:
    """LoRS on centred task vectors (lors' own variant, ``lors_centred``), split into the part
    lambda scales and the part it does not: returns (pruned sum, mean).

    mean = sum_i w_i tau_i / sum_i w_i; c_i = tau_i - mean; pruned sum = sum_i w_i P(c_i) with
    P = :func:`lors_prune` at ``rank`` and ``keep`` (rank-r part + top-k of its residual). The
    merge is theta_0 + mean + lambda * pruned sum: the direction all experts share is added
    once, instead of T times with every expert's copy scaled down by one lambda as in LoRS,
    and LoRS prunes only what is specific to each expert. ``factors(i, c_i)``, when given,
    returns c_i's top-``rank`` triplets (a cache); else :func:`truncated_svd` with
    ``svd_options``. The inputs are not modified.
    """
    weights = [1.0] * len(task_matrices) if weights is None else list(weights)
    mean = weighted_mean(task_matrices, weights)
    pruned = torch.zeros_like(mean)
    for i, (tau, weight) in enumerate(zip(task_matrices, weights)):
        centred = tau - mean
        given = factors(i, centred) if factors else None
        pruned.add_(lors_prune(centred, rank, keep, factors=given, **svd_options), alpha=weight)
    return pruned, mean


def cart_combine(task_matrices: Sequence[Tensor], rank: int,
                 weights: Sequence[float] | None = None, *, factors: Factors | None = None,
                 **svd_options) -> tuple[Tensor, Tensor]:
    """CART (Choi et al. 2024, arXiv 2412.12153) of T task matrices of one layer, split into
    the part lambda scales and the part it does not: returns (low-rank sum, mean).

    mean = sum_i w_i tau_i / sum_i w_i (weights default to 1: the plain average);
    c_i = tau_i - mean (the task vectors centred on the weight average);
    low-rank sum = sum_i w_i L_i, L_i the rank-``rank`` truncation U_r diag(S_r) V_r^T of c_i.
    The merge is theta_0 + mean + lambda * low-rank sum, as in the paper (a sum over i, lambda
    on it only). ``factors(i, c_i)``, when given, returns c_i's top-``rank`` triplets (e.g. from
    a cache); else :func:`truncated_svd` with ``svd_options``. The inputs are not modified.
    """
    weights = [1.0] * len(task_matrices) if weights is None else list(weights)
    mean = weighted_mean(task_matrices, weights)
    low_rank = torch.zeros_like(mean)
    for i, (tau, weight) in enumerate(zip(task_matrices, weights)):
        centred = tau - mean
        u, s, vh = factors(i, centred) if factors else truncated_svd(centred, rank, **svd_options)
        low_rank.addmm_(u * s, vh, alpha=weight)
    return low_rank, mean


def iso_cts_split(rank: int, experts: int, common_ratio: float) -> tuple[int, int]:
    """Iso-CTS' (k, s): k common directions and s task-specific directions per expert, with
    k + T s = r = ``rank`` = min(m, n), as the authors' code sizes them.

    k0 = floor(common_ratio * r); s = round((r - k0) / T) (Python's round: halves to even),
    at most floor(r / T); k = r - T s (so the T s task-specific directions divide evenly).
    """
    per_task = min(round((rank - int(common_ratio * rank)) / experts), rank // experts)
    return rank - experts * per_task, per_task


def iso_cts_combine(task_matrices: Sequence[Tensor], common_ratio: float) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, "No Task Left Behind"): isotropic merge in the common and
    the task-specific subspaces of T task matrices of one layer (m x n, r = min(m, n)).

    (k, s) = :func:`iso_cts_split`. The common subspace: the top-k triplets (U_k, S_k, V_k) of
    the sum M = sum_i tau_i. Each task's residual outside it, R_i = tau_i - U_k U_k^T tau_i,
    gives its top-s triplets (P_i, E_i, Q_i). U* = [U_k, P_1, ..., P_T] (m x r) and
    V* = [V_k, Q_1, ..., Q_T] (n x r) are orthogonalised (Procrustes, :func:`orthogonalise`),
    and every singular value is replaced by their mean sigma = mean(S_k, E_1, ..., E_T) (the
    r values kept): the result is sigma U*_perp V*_perp^T. Weighted experts pass w_i tau_i.
    With common_ratio 1 (s = 0) this is Iso-C; exact SVDs throughout.
    """
    m, n = task_matrices[0].shape
    rank = min(m, n)
    k, per_task = iso_cts_split(rank, len(task_matrices), common_ratio)
    summed = torch.stack(list(task_matrices)).sum(dim=0)
    u, s, vh = thin_svd(summed)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    common = u[:, :k]
    for tau in task_matrices:
        residual = tau - common @ (common.T @ tau)
        p, e, qh = thin_svd(residual)
        us.append(p[:, :per_task])
        ss.append(e[:per_task])
        vs.append(qh[:per_task].T)
    sigma = torch.cat(ss).mean()
    return (orthogonalise(torch.cat(us, dim=1)) * sigma) @ orthogonalise(torch.cat(vs, dim=1)).T


SVC_NEGLIGIBLE = 1e-4  # a task response below this fraction of the merged one does not count


def svc_calibrate(merged: Tensor, task_matrices: Sequence[Tensor], alpha: float) -> Tensor:
    """Singular Value Calibration (Li et al. 2026, arXiv 2602.05536) of one merged delta.

    merged = U diag(S) V^T (exact thin SVD). For each direction r and each of the K tasks:
    a_r = u_r^T merged (= S_r v_r^T) and a_r^i = u_r^T tau_i;
    s_r^i = <a_r, a_r^i> / ||a_r^i||^2, and s_r^i = 0 where the task does not act along u_r:
    ||a_r^i|| <= SVC_NEGLIGIBLE * ||a_r|| (1e-4; this includes a_r^i = 0; without it a
    rounding-level response would give an arbitrarily large s and erase the direction);
    gamma_r = K / sum_i max(alpha, s_r^i), alpha > 0, not capped at 1 (0 < gamma_r <= 1/alpha:
    over-counted directions, s > 1, shrink; diluted ones, alpha < s < 1, grow back).
    Returns U diag(gamma * S) V^T; the singular vectors are unchanged.
    """
    u, s, vh = thin_svd(merged)
    response = s[:, None] * vh  # a_r, one row per direction (||a_r|| = S_r)
    total = torch.zeros_like(s)
    for tau in task_matrices:
        projected = u.T @ tau  # a_r^i, one row per direction
        norm = projected.square().sum(dim=1)
        acts = norm > (SVC_NEGLIGIBLE * s).square()
        coefficient = torch.where(acts, (response * projected).sum(dim=1)
                                  / torch.where(acts, norm, 1.0), 0.0)
        total += coefficient.clamp(min=alpha)
    gamma = len(task_matrices) / total
    return (u * (gamma * s)) @ vh
