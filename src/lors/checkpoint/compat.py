"""Checks that every expert fits the base, run before the merge writes anything.

What is checked, in order: the architecture fields of the configs; identical tensor names,
shapes and floating-point-ness (metadata only); then that each expert's weights are close to
the base's on a small fixed sample of weight matrices, which is what separates a fine-tune of
this base from a model with another initialisation or pre-training (see ``check_same_base``).
"""

from __future__ import annotations

import math
import re
import statistics
import warnings
from dataclasses import dataclass

import torch

from ..errors import CompatibilityError, LorsWarning
from .reader import Checkpoint

ARCHITECTURE_FIELDS = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "num_mel_bins",
    "vocab_size", "max_source_positions", "max_target_positions",
)
TOKEN_EMBEDDING = "model.decoder.embed_tokens.weight"
# Per side: (layer position, tensor) with position 0 = first, 0.5 = middle, 1 = last layer.
SAMPLE_ROLES: dict[str, tuple[tuple[float, str], ...]] = {
    "encoder": ((0, "self_attn.v_proj.weight"), (0.5, "fc1.weight"),
                (1, "self_attn.out_proj.weight")),
    "decoder": ((0, "self_attn.v_proj.weight"), (0.5, "fc1.weight"),
                (0.5, "encoder_attn.q_proj.weight"), (1, "self_attn.out_proj.weight")),
}
MIN_COSINE = 0.5
"""An expert is refused when any sampled tensor has a lower cosine with the base's copy."""
OVERRIDE = "allow_other_base: true in the merge config, or --allow-other-base"
# Elements compared per tensor: every k-th row, so that the token embedding (26.6 M in Whisper
# base) costs no more than a small matrix. 1/sqrt(2^20) = 0.001: the cosine of unrelated
# weights is still ~0 and the figures of a fine-tune are estimated to a few per mille.
MAX_COMPARED = 1 << 20


@dataclass(frozen=True)
class Similarity:
    """How far one expert tensor is from the base's copy.

    ``distance`` is ||expert - base|| / ||base||; ``cosine`` is <expert, base> / (||expert||
    ||base||). Two zero tensors give (0, 1); a zero base under a non-zero expert gives (inf, 0),
    a zero expert over a non-zero base (1, 0).
    """

    tensor: str
    distance: float
    cosine: float

    def describe(self) -> str:
        return f"{self.tensor}: relative distance {self.distance:.3g}, cosine {self.cosine:.3g}"


def check_experts(base: Checkpoint, experts: dict[str, Checkpoint], *,
                  allow_other_base: bool = False) -> dict[str, list[Similarity]]:
    """Raise CompatibilityError naming the expert, file and tensor at the first mismatch.

    Configs and tensor metadata are checked for every expert first (no weights read); then
    ``check_same_base`` reads the sampled tensors. Returns, per expert, the similarity figures
    of the sampled tensors. With ``allow_other_base`` an expert that looks foreign is merged
    anyway and a LorsWarning with its figures is emitted instead of the error.
    """
    for name, expert in experts.items():
        _check_config(base, name, expert)
        _check_tensors(base, name, expert)
    return check_same_base(base, experts, allow_other_base=allow_other_base)


def _check_config(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    for key in ARCHITECTURE_FIELDS:
        ours, theirs = base.config.get(key), expert.config.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): config {key} = {theirs}, base "
                f"({base.source}) has {ours}; experts must share the base's architecture "
                "(a different model size, mel bins or vocabulary cannot be merged)")


def _check_tensors(base: Checkpoint, name: str, expert: Checkpoint) -> None:
    missing = sorted(set(base.meta) - set(expert.meta))
    extra = sorted(set(expert.meta) - set(base.meta))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
        raise CompatibilityError(f"expert {name!r} ({expert.source}) " + " and ".join(parts)
                                 + "; was it saved from the same Whisper architecture?")
    for tensor, meta in base.meta.items():
        other = expert.meta[tensor]
        if other.shape != meta.shape:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): tensor {tensor} has shape "
                f"{list(other.shape)}, base has {list(meta.shape)}")
        if other.dtype.is_floating_point != meta.dtype.is_floating_point:
            raise CompatibilityError(
                f"expert {name!r} ({expert.source}): tensor {tensor} is {other.dtype}, "
                f"base has {meta.dtype}")


def sample_tensors(base: Checkpoint) -> list[str]:
    """The tensors compared with the base: the token embedding and, per side, the first
    layer's self-attention v_proj, the middle layer's fc1, the last layer's self-attention
    out_proj, and (decoder) the middle layer's cross-attention q_proj: 8 tensors at most.

    Names the base lacks, and tensors that are not floating-point matrices, are left out.
    Deterministic: it depends only on the base's tensor names.
    """
    names = [TOKEN_EMBEDDING]
    for side, roles in SAMPLE_ROLES.items():
        layers = _layer_count(base, side)
        if layers:
            names += [f"model.{side}.layers.{round(at * (layers - 1))}.{tensor}"
                      for at, tensor in roles]
    return [n for n in names if n in base.meta and len(base.meta[n].shape) == 2
            and base.meta[n].dtype.is_floating_point]


def _layer_count(base: Checkpoint, side: str) -> int:
    pattern = re.compile(rf"^model\.{side}\.layers\.(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, base.meta) if m]
    return max(found) + 1 if found else 0


def similarity(tensor: str, ours: torch.Tensor, theirs: torch.Tensor) -> Similarity:
    """Relative distance and cosine of ``theirs`` to ``ours`` (same shape, any float dtypes),
    computed in float64: pass at most ``MAX_COMPARED`` elements (``strided_rows``), since
    each input gets a float64 copy."""
    a, b = ours.reshape(-1).double(), theirs.reshape(-1).double()
    diff = b - a  # directly, not base_sq + expert_sq - 2 dot: that cancels to noise
    base_sq, expert_sq = float(a @ a), float(b @ b)
    dot, diff_sq = float(a @ b), float(diff @ diff)
    if base_sq == 0.0:
        return Similarity(tensor, 0.0 if expert_sq == 0.0 else math.inf,
                          1.0 if expert_sq == 0.0 else 0.0)
    # NaN stays NaN (no refusal here): the merge's NaN/Inf check names the tensor
    cosine = 0.0 if expert_sq == 0.0 else dot / math.sqrt(base_sq * expert_sq)
    return Similarity(tensor, math.sqrt(diff_sq / base_sq), cosine)


def strided_rows(matrix: torch.Tensor, limit: int = MAX_COMPARED) -> torch.Tensor:
    """Every k-th row of ``matrix`` from row 0, with the smallest k that keeps at most
    ``limit`` elements (k = 1 for a matrix that fits). Depends only on the shape."""
    step = max(1, math.ceil(matrix.numel() / limit))
    return matrix[::step]


def check_same_base(base: Checkpoint, experts: dict[str, Checkpoint], *,
                    allow_other_base: bool = False) -> dict[str, list[Similarity]]:
    """Refuse experts that are not close to the base on the sampled tensors.

    Returns each expert's figures (see ``Similarity``), in ``sample_tensors`` order. Raises
    CompatibilityError naming every foreign expert, or with ``allow_other_base`` emits the
    same text as a LorsWarning and returns; experts that pass give no warning either way.

    Cost: each sampled tensor of the base is read once and each expert's copy one at a time
    (one whole tensor in memory at a time, plus float64 copies of the compared rows), and at
    most ``MAX_COMPARED`` elements per tensor are compared. Whisper base: 8 tensors read,
    30.0 M of 72.6 M parameters (the token embedding is 26.6 M of them), 4.4 M compared.
    Whisper large-v3: 88 M of 1.55 G read (6%). Measured for 3 Whisper base experts on a
    loaded 2-core machine: 0.5-0.6 s with one torch thread, 1.1-1.8 s with two, beside 3.4-5.4 s
    for the whole task-arithmetic merge (which reads these tensors again, from the page cache).

    Rule: refuse when any sampled tensor has cosine < ``MIN_COSINE`` = 0.5 with the base's.
    - A fine-tune adds a task vector d to the base w. With ||d|| = r ||w|| the cosine is at
      least sqrt(1 - r^2), so a cosine below 0.5 needs r > 0.87: the tensor moved by 87% of
      its own norm. Full Whisper fine-tunes are expected to move matrices by well under 10%
      (cosine > 0.995; not measured here, no fine-tuned Whisper is at hand). Measured on
      Whisper base plus noise of r = 0.01 / 0.05 / 0.1 / 0.5 / 1.0: cosine 1.000 / 0.999 /
      0.995 / 0.894 / 0.707; storing it in bf16 gives r = 1.7e-3, in fp16 r = 0. A tiny
      Whisper really trained by lors.training (AdamW, 3-12 steps at lr 3e-3-1e-2, far more
      per step than a real fine-tune): r = 0.15-0.26, cosine 0.967-0.990. The tiny test
      experts (lors.tiny, noise as large as the weights) have r ~ 1.0, cosine 0.68-0.74.
    - A model from another initialisation has its hidden units in another order, so its
      cosine is 0 +- 1/sqrt(size). Measured: a random init (std 0.02) against Whisper base,
      |cosine| < 0.003 on every sampled tensor; two tiny random models, |cosine| < 0.07.
    - Its relative distance is sqrt(1 + (||other|| / ||w||)^2) (measured 1.23-1.45 against
      Whisper base, 1.4-1.8 on tiny models), which overlaps the tiny experts' 0.94-1.09 and
      drops towards 1 for a foreign model of small norm; so the distance is reported, but
      only the cosine decides.
    - Any tensor, not the median: an expert with some foreign layers (a decoder taken from
      another model) is refused too; a single re-initialised matrix would be as well.

    Non-finite figures (NaN or Inf weights) do not refuse; the merge's NaN/Inf check names
    the tensor. Passing shows that an expert is close to this base, not that it was trained
    from it bit for bit.
    """
    names = sample_tensors(base)
    figures: dict[str, list[Similarity]] = {name: [] for name in experts}
    for tensor in names:
        ours = strided_rows(base.read(tensor)).double()  # a copy: the full tensor is freed
        for name, expert in experts.items():
            theirs = strided_rows(expert.read(tensor))
            figures[name].append(similarity(tensor, ours, theirs))
    foreign = {name: sims for name, sims in figures.items()
               if any(s.cosine < MIN_COSINE for s in sims)}
    if foreign:
        report = "; ".join(_describe_foreign(base, name, experts[name], sims)
                           for name, sims in foreign.items())
        if not allow_other_base:
            raise CompatibilityError(
                f"{report}. Merge only experts fine-tuned from {base.source}, or name the base "
                f"they were fine-tuned from; to merge anyway set {OVERRIDE} on the command line "
                "(the task vectors of a model from another base are not a fine-tuning update, "
                "so expect a broken merge)")
        warnings.warn(f"{report}; merging anyway because allow_other_base is set: expect a "
                      "broken merge", LorsWarning, stacklevel=3)
    return figures


def _describe_foreign(base: Checkpoint, name: str, expert: Checkpoint,
                      sims: list[Similarity]) -> str:
    worst = sorted(sims, key=lambda s: s.cosine)[:3]
    below = sum(s.cosine < MIN_COSINE for s in sims)
    distance = statistics.median(s.distance for s in sims)
    return (f"expert {name!r} ({expert.source}) was not fine-tuned from this base "
            f"({base.source}): {below} of {len(sims)} sampled weight tensors have cosine < "
            f"{MIN_COSINE} with the base's (fine-tunes keep > 0.99, unrelated weights ~0), median "
            f"relative distance ||expert - base|| / ||base|| {distance:.3g} (fine-tunes: well "
            "under 0.1); worst: "
            + "; ".join(s.describe() for s in worst)
            + ". This check shows whether an expert is close to the base, not that it was "
            "trained from it bit for bit")
