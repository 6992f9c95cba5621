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

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from .groups import GROUPS
from .methods import METHOD_ALIASES, METHODS, OPS

# Which parameters each op reads: a parameter no used op reads is a mistake worth reporting.
OP_PARAMETERS: dict[str, set[str]] = {
    "lors": {"lambda", "rank", "rank_ratio", "keep", "svd", "svd_oversample", "svd_niter"},
    "svd": {"lambda", "rank", "rank_ratio", "svd", "svd_oversample", "svd_niter"},
    "magnitude": {"lambda", "keep", "scope"},
    "ties": {"lambda", "keep", "scope"},
    "dare": {"lambda", "keep", "dare_combine"},
    "task_arithmetic": {"lambda"}, "tsv": {"lambda"}, "iso_c": {"lambda"},
    "average": set(), "keep_base": set(),
}


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    weight: float = 1.0


class MergeParameters(BaseModel):
    """Hyper-parameters; None means the method's default. ``keep`` is always the fraction kept."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float | None = Field(default=None, alias="lambda")
    rank: int | None = Field(default=None, ge=1)
    rank_ratio: float | None = Field(default=None, gt=0, le=1)
    keep: float | None = Field(default=None, ge=0, le=1)
    scope: Literal["tensor", "global"] | None = None
    dare_combine: Literal["linear", "ties"] | None = None
    svd: Literal["randomized", "exact"] = "randomized"
    svd_oversample: int = Field(default=10, ge=2)
    svd_niter: int = Field(default=2, ge=0)
    seed: int = 0


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = "base"
    experts: list[ExpertSpec] = Field(min_length=1)
    method: str
    parameters: MergeParameters = MergeParameters()
    groups: dict[str, str] = {}
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    shard_size_mb: float = Field(default=2000, gt=0)

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
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{source}: invalid merge config: {problems}") from exc


def resolve(config: MergeConfig) -> tuple[str, dict, dict[str, str]]:
    """(method name, resolved parameters, op per group), every default filled in.

    Raises ConfigError when a parameter is set that none of the ops in use reads.
    """
    method_name, implied = METHOD_ALIASES.get(config.method, (config.method, {}))
    method = METHODS[method_name]
    ops = {group: config.groups.get(group, method.op_for_group(group)) for group in GROUPS}
    given = config.parameters.model_dump(by_alias=True, exclude_none=True,
                                         exclude_defaults=True)
    used = set().union(*(OP_PARAMETERS[op] for op in ops.values()))
    unused = sorted(set(given) - used - {"seed", "svd", "svd_oversample", "svd_niter"})
    if unused:
        raise ConfigError(f"parameter(s) {unused} are not used by method {config.method!r} "
                          f"(with these group ops); it reads: {sorted(used) or 'nothing'}")
    if "rank" in given and "rank_ratio" in given:
        raise ConfigError("give either rank or rank_ratio, not both")
    params: dict = {}
    for op in dict.fromkeys([method.matrix_op, method.other_op, *ops.values()]):
        for key, value in METHODS.get(op, method).defaults.items():
            params.setdefault(key, value)
    params.update(implied)
    params.update(config.parameters.model_dump(by_alias=True, exclude_none=True))
    if "lambda" not in given:
        default = method.default_lambda
        params["lambda"] = 1.0 / len(config.experts) if default == "1/T" else float(default)
    if "rank_ratio" in params:
        params.pop("rank", None)
    return method_name, params, ops
