"""Declarative merge configuration, validated up front (pydantic) and resolved to plain values.

YAML form::

    base: base                      # a path, hub id, or "base" for the embedded default
    experts:
      - {name: de_asr, path: experts/de_asr, weight: 1.0}
      - {name: fr_asr, path: experts/fr_asr}
    method: lors
    parameters: {rank: 7, keep: 0.2, lambda: 0.5, seed: 0}
    groups: {token_embedding: keep_base}   # per-group op override
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError, LorsWarning
from .groups import GROUPS
from .methods import METHOD_ALIASES, METHODS, OPS, SVD_PARAMETERS, method_defaults

# Read by every op that is seeded or decomposes; never reported as unused.
ALWAYS_ALLOWED = frozenset({"seed"}) | SVD_PARAMETERS


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    weight: float = 1.0


class MergeParameters(BaseModel):
    """Hyper-parameters; None means the method's default. ``keep`` is always the fraction kept
    (0 < keep <= 1: keeping nothing is the base itself, ``keep_base``). Every number must be
    finite."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    lambda_: float | None = Field(default=None, alias="lambda")
    rank: int | None = Field(default=None, ge=1)
    rank_ratio: float | None = Field(default=None, gt=0, le=1)
    keep: float | None = Field(default=None, gt=0, le=1)
    scope: Literal["tensor", "global"] | None = None
    dare_combine: Literal["linear", "ties"] | None = None
    svd: Literal["randomized", "exact"] = "randomized"
    svd_oversample: int = Field(default=10, ge=2)
    svd_niter: int = Field(default=2, ge=0)
    seed: int = 0


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    base: str = "base"
    experts: list[ExpertSpec] = Field(min_length=1)
    method: str
    parameters: MergeParameters = MergeParameters()
    groups: dict[str, str] = {}
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_size_mb: float = Field(default=2000, gt=0)
    # skip the check that each expert is close to this base (see lors.checkpoint.compat)
    allow_other_base: bool = False

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS and method not in METHOD_ALIASES:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}, "
                             f"aliases {', '.join(sorted(METHOD_ALIASES))}")
        return method

    @field_validator("groups")
    @classmethod
    def _known_groups(cls, groups: dict[str, str]) -> dict[str, str]:
        for group, op in groups.items():
            if group not in GROUPS:
                raise ValueError(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
            if op not in OPS:
                raise ValueError(f"group {group!r}: unknown op {op!r}; ops: {', '.join(OPS)}")
        return groups

    @field_validator("experts")
    @classmethod
    def _unique_names(cls, experts: list[ExpertSpec]) -> list[ExpertSpec]:
        names = [e.name for e in experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"expert names must be unique; repeated: {duplicates}")
        return experts


def load_config(path: Path) -> MergeConfig:
    """Read and validate a YAML merge config; errors name the file and the field."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from exc
    return validate_config(raw, source=str(path))


def validate_config(raw: object, source: str = "config") -> MergeConfig:
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid merge config: {_problems(exc)}") from exc


def resolve(config: MergeConfig) -> tuple[str, dict, dict[str, str]]:
    """(method name, resolved parameters, op per group) of a validated config."""
    return resolve_method(config.method, config.parameters, config.groups,
                          [e.weight for e in config.experts])


def resolve_method(method: str, parameters: MergeParameters | dict, groups: dict[str, str],
                   weights: list[float]) -> tuple[str, dict, dict[str, str]]:
    """(method name, parameters with every default filled in, op per group) for experts of
    these ``weights``; needs no files, so the search resolves exactly as the engine does.

    Raises ConfigError when a parameter is set that none of the ops in use reads, when both
    rank and rank_ratio are given, and when a mean's weights sum to zero. Warns on a negative
    lambda (it subtracts the experts' task vectors).
    """
    if isinstance(parameters, dict):
        parameters = validate_parameters(parameters, f"method {method}")
    method_name, implied = METHOD_ALIASES.get(method, (method, {}))
    spec = METHODS[method_name]
    ops = {group: groups.get(group, spec.op_for_group(group)) for group in GROUPS}
    given = parameters.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
    used = set().union(*(OPS[op].parameters for op in ops.values()))
    unused = sorted(set(given) - used - ALWAYS_ALLOWED)
    if unused:
        raise ConfigError(f"parameter(s) {unused} are not used by method {method!r} "
                          f"(with these group ops); it reads: {sorted(used) or 'nothing'}")
    if "rank" in given and "rank_ratio" in given:
        raise ConfigError("give either rank or rank_ratio, not both")
    params = method_defaults(spec)
    for op in ops.values():  # defaults of ops that only a group override brings in
        for key, value in OPS[op].defaults.items():
            params.setdefault(key, value)
    params.update(implied)
    params.update(parameters.model_dump(by_alias=True, exclude_none=True))
    if "lambda" not in given:
        default = OPS[spec.matrix_op].lambda_default(params)
        params["lambda"] = 1.0 / len(weights) if default == "1/T" else float(default)
    if "rank_ratio" in params:
        params.pop("rank", None)
    _check_weights(ops, weights)
    if params["lambda"] < 0 and "lambda" in used:
        warnings.warn(f"lambda {params['lambda']} is negative: the merge subtracts the experts' "
                      "task vectors (task negation)", LorsWarning, stacklevel=3)
    return method_name, params, ops


def _check_weights(ops: dict[str, str], weights: list[float]) -> None:
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"expert weights must be finite numbers, got {weights}")
    if "average" in ops.values() and sum(weights) == 0:
        raise ConfigError(f"the weighted mean (op 'average') divides by the sum of the expert "
                          f"weights, which is 0 ({weights}); give weights that do not cancel")


def validate_parameters(raw: dict, source: str) -> MergeParameters:
    """Validated parameters; ConfigError naming ``source`` and the field."""
    try:
        return MergeParameters.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid merge parameters: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                     for e in exc.errors())
