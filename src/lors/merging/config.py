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
from .groups import GROUPS, MATRIX_GROUPS
from .methods import CALIBRATIONS, METHOD_ALIASES, METHODS, OPS, SVD_PARAMETERS, method_defaults

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
    # lambda per parameter group and layer block; keys from lambda_selectors(), e.g.
    # {"encoder.lower": 0.1, "cross_attention": 0.3}; other tensors use lambda
    lambdas: dict[str, float] | None = None
    rank: int | None = Field(default=None, ge=1)
    rank_ratio: float | None = Field(default=None, gt=0, le=1)
    keep: float | None = Field(default=None, gt=0, le=1)
    scope: Literal["tensor", "global"] | None = None
    dare_combine: Literal["linear", "ties"] | None = None
    common_ratio: float | None = Field(default=None, ge=0, le=1)  # Iso-CTS' common subspace
    svc_alpha: float | None = Field(default=None, gt=0)  # SVC strength; needs calibrate
    svd: Literal["randomized", "exact"] = "randomized"
    svd_oversample: int = Field(default=10, ge=2)
    svd_niter: int = Field(default=2, ge=0)
    seed: int = 0

    @field_validator("lambdas")
    @classmethod
    def _known_selectors(cls, lambdas: dict[str, float] | None) -> dict[str, float] | None:
        unknown = sorted(set(lambdas or {}) - set(lambda_selectors()))
        if unknown:
            raise ValueError(f"lambdas: unknown group or block {unknown}; use a group "
                             f"({', '.join(GROUPS)}) or encoder/decoder, optionally with "
                             ".lower or .upper (the lower or upper half of the layers)")
        return lambdas


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    base: str = "base"
    experts: list[ExpertSpec] = Field(min_length=1)
    method: str
    parameters: MergeParameters = MergeParameters()
    groups: dict[str, str] = {}
    # post-step on the merged 2-D attention/FFN matrices; None: the method's own (svc: "svc")
    calibrate: Literal["svc"] | None = None  # the choices are methods.CALIBRATIONS
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

    @field_validator("calibrate", mode="before")
    @classmethod
    def _known_calibration(cls, calibrate: object) -> object:
        if calibrate is not None and calibrate not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibrate!r}; choices: "
                             f"{', '.join(CALIBRATIONS)}, or null (the method's own: none, "
                             "except svc for method svc)")
        return calibrate

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


def lambda_selectors() -> list[str]:
    """The keys ``lambdas`` accepts: every group and side, each also with ``.lower`` or
    ``.upper`` (the first or second half of that side's layers). The most specific key that
    matches a tensor wins: group.half, group, side.half, side (:func:`core.lambda_for`)."""
    names = [*GROUPS, "encoder", "decoder"]
    return names + [f"{n}.{half}" for n in names for half in ("lower", "upper")]


def resolve(config: MergeConfig) -> tuple[str, dict, dict[str, str]]:
    """(method name, resolved parameters, op per group) of a validated config."""
    return resolve_method(config.method, config.parameters, config.groups,
                          [e.weight for e in config.experts], calibrate=config.calibrate)


def resolve_method(method: str, parameters: MergeParameters | dict, groups: dict[str, str],
                   weights: list[float], calibrate: str | None = None
                   ) -> tuple[str, dict, dict[str, str]]:
    """(method name, parameters with every default filled in, op per group) for experts of
    these ``weights``; needs no files, so the search resolves exactly as the engine does.

    ``calibrate`` (None: the method's own, "svc" for method svc) adds the post-step to the
    parameters as ``calibrate`` with its ``svc_alpha`` (default 1/T, the SVC authors' setting);
    without calibration neither key is present. Raises ConfigError when a parameter is set
    that none of the ops in use reads (svc_alpha without calibrate), when both rank and
    rank_ratio are given, when a mean's weights sum to zero, and when calibrate meets no
    merged 2-D matrix. Warns on a negative lambda (it subtracts the experts' task vectors).
    """
    if isinstance(parameters, dict):
        parameters = validate_parameters(parameters, f"method {method}")
    method_name, implied = METHOD_ALIASES.get(method, (method, {}))
    spec = METHODS[method_name]
    ops = {group: groups.get(group, spec.op_for_group(group)) for group in GROUPS}
    given = parameters.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
    calibrate = calibrate if calibrate is not None else spec.calibrate
    if calibrate is not None and calibrate not in CALIBRATIONS:
        raise ConfigError(f"unknown calibration {calibrate!r}; choices: {', '.join(CALIBRATIONS)}")
    used = set().union(*(OPS[op].parameters for op in ops.values()))
    if "svc_alpha" in given and calibrate is None:
        raise ConfigError("svc_alpha is the strength of the SVC calibration, which is off: set "
                          "calibrate: svc (--calibrate svc) or use method svc, or drop svc_alpha")
    if "lambda" in used:
        used.add("lambdas")
    unused = sorted(set(given) - used - ALWAYS_ALLOWED - ({"svc_alpha"} if calibrate else set()))
    if unused:
        raise ConfigError(f"parameter(s) {unused} are not used by method {method!r} "
                          f"(with these group ops); it reads: {sorted(used) or 'nothing'}")
    if "rank" in given and "rank_ratio" in given:
        raise ConfigError("give either rank or rank_ratio, not both")
    if calibrate is not None and all(ops[g] == "keep_base" for g in MATRIX_GROUPS):
        raise ConfigError(f"calibrate {calibrate!r} acts on the merged 2-D attention/FFN "
                          "matrices, but every matrix group keeps the base (op keep_base): "
                          "there is nothing to calibrate; drop calibrate or merge those groups")
    params = method_defaults(spec)
    for op in ops.values():  # defaults of ops that only a group override brings in
        for key, value in OPS[op].defaults.items():
            params.setdefault(key, value)
    params.update(parameters.model_dump(by_alias=True, exclude_none=True))
    # what an alias implies beats the defaults, never a value the user gave
    explicit = parameters.model_dump(by_alias=True, include=parameters.model_fields_set)
    params.update({key: value for key, value in implied.items() if key not in explicit})
    if "lambda" not in given:
        default = OPS[spec.matrix_op].lambda_default(params)
        params["lambda"] = 1.0 / len(weights) if default == "1/T" else float(default)
    if "rank" in given:  # a rank given beats a default rank_ratio (CART's) and vice versa
        params.pop("rank_ratio", None)
    elif "rank_ratio" in params:
        params.pop("rank", None)
    if calibrate is not None:
        params["calibrate"] = calibrate
        params.setdefault("svc_alpha", 1.0 / len(weights))
    _check_weights(ops, weights)
    if params["lambda"] < 0 and "lambda" in used:
        warnings.warn(f"lambda {params['lambda']} is negative: the merge subtracts the experts' "
                      "task vectors (task negation)", LorsWarning, stacklevel=3)
    return method_name, params, ops


def _check_weights(ops: dict[str, str], weights: list[float]) -> None:
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"expert weights must be finite numbers, got {weights}")
    means = sorted({"average", "cart"} & set(ops.values()))
    if means and sum(weights) == 0:
        raise ConfigError(f"the weighted mean (op {' and '.join(map(repr, means))}) divides by "
                          f"the sum of the expert weights, which is 0 ({weights}); give "
                          "weights that do not cancel")


def validate_parameters(raw: dict, source: str) -> MergeParameters:
    """Validated parameters; ConfigError naming ``source`` and the field."""
    try:
        return MergeParameters.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid merge parameters: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                     for e in exc.errors())
