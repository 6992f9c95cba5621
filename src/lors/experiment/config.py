"""The experiment config: validated up front, before any speech is rendered or model trained."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import __version__
from ..errors import ConfigError
from ..merging import validate_config
from ..merging.config import resolve
from ..merging.groups import GROUPS, MATRIX_GROUPS
from ..merging.methods import METHOD_ALIASES, METHODS, OPS

Setting = Literal["asr", "st", "multitask", "all"]
SETTING_TITLES = {"asr": "Multi-lingual ASR", "st": "Multi-lingual ST",
                  "multitask": "Multi-task ({language})", "all": "All languages and tasks"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """Where the speech comes from and how much of each split a pair uses."""

    manifest: str | None = None  # None: the sentence bank rendered with espeak-ng
    train_per_pair: int | None = Field(default=None, ge=1)
    dev_per_pair: int | None = Field(default=None, ge=1)
    test_per_pair: int | None = Field(default=None, ge=1)
    # no sentence is trained on in two languages (each language its own sentences, as in
    # CoVoST 2); dev and test splits are unchanged
    disjoint_languages: bool = False
    # seeded degradation of the rendered speech (not of a given manifest), per clip a value
    # drawn from each range: {noise_snr: [lo, hi] dB, reverb_rt60: [lo, hi] seconds};
    # degraded speech is cached apart from clean speech
    augment: dict[str, Any] | None = None

    @field_validator("augment")
    @classmethod
    def _augment(cls, value: dict[str, Any] | None) -> dict[str, list[float]] | None:
        from ..data.synth import Augmentation  # lazy: numpy and soundfile only when used
        from ..errors import LorsError
        if value is None:
            return None
        try:
            return Augmentation.coerce(value).as_dict() or None
        except LorsError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _augment_needs_rendered_speech(self) -> "DataSpec":
        if self.augment and self.manifest is not None:
            raise ValueError("augment degrades the speech lors renders; it does not apply "
                             "to a given manifest (drop one of them)")
        return self


class TrainingSpec(_Strict):
    """How experts, the MTL model and sequential stages are trained (same recipe for all)."""

    mode: Literal["full", "freeze-encoder", "lora"] = "full"
    max_steps: int | None = Field(default=None, ge=1)  # per expert and per sequential stage
    epochs: float = Field(default=3.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    seed: int = 0
    select: Literal["token-accuracy", "wer-bleu"] = "token-accuracy"
    eval_every: int | None = Field(default=None, ge=1)
    # dev evaluations per model (and per sequential stage), spread evenly over its run: the
    # same number of checks for every model whatever its length (wins over eval_every)
    eval_times: int | None = Field(default=None, ge=1)
    # stop a model (or stage) once its dev score has not improved for this many evaluations
    # in a row; epochs / max_steps stay the cap. None: train to the cap
    patience: int | None = Field(default=None, ge=1)
    save_every: int | None = Field(default=None, ge=1)  # resumable checkpoints (default: each eval)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


class SearchSpec(_Strict):
    """The dev-set hyper-parameter search of every merge method.

    ``equal_budget``: every method that has parameters to tune must list the same number of
    grid points, so no method wins by being searched harder. ``widen_edges``: when the best
    lambda is the largest or smallest of its grid, up to this many points are added past that
    edge (one grid step further, or half the smallest lambda); a choice still on an edge is
    flagged in the report.
    """

    metric: Literal["token-accuracy", "wer-bleu"] = "token-accuracy"
    equal_budget: bool = True
    widen_edges: int = Field(default=2, ge=0)
    # then this many random points with a lambda per block (encoder, decoder, cross-attention;
    # lower and upper layers) around each method's best point; 0: one lambda for everything
    block_lambdas: int = Field(default=0, ge=0)


class EvaluationSpec(_Strict):
    batch_size: int = Field(default=8, ge=1)
    num_beams: int = Field(default=1, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)


class ExtensibilitySpec(_Strict):
    """Add ``language`` to a merge of the other languages and compare the ways to do it."""

    language: str


class ExperimentConfig(_Strict):
    """``methods`` maps each merge method to a grid: parameter -> value or list of values."""

    name: str = "experiment"
    base: str | None = None
    languages: list[str]
    tasks: list[Literal["asr", "st"]] = ["asr", "st"]
    settings: list[Setting] = ["all"]
    baselines: list[Literal["mtl", "mtl_plateau", "sequential"]] = ["mtl", "sequential"]
    methods: dict[str, dict[str, Any]]
    data: DataSpec = DataSpec()
    training: TrainingSpec = TrainingSpec()
    search: SearchSpec = SearchSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    extensibility: ExtensibilitySpec | None = None
    # How every method merges the groups outside the 2-D attention/FFN matrices (biases,
    # LayerNorms, conv front-end, embeddings: the token embedding alone is about a third of
    # Whisper base). "average": their mean task vector, whatever the method and lambda (one
    # policy, so rankings compare matrix merging only); "task_arithmetic": lambda * sum;
    # "keep_base": the base's; "method": each method's own choice (LoRS and task arithmetic
    # scale the sum by lambda, TIES and DARE prune, TSV and Iso-C average).
    non_matrix: Literal["average", "task_arithmetic", "keep_base", "method"] = "average"
    out: str = "runs/experiment"

    @field_validator("languages")
    @classmethod
    def _languages(cls, languages: list[str]) -> list[str]:
        if not languages:
            raise ValueError("at least one language is needed")
        for language in languages:
            if not (language.isalpha() and language.islower() and len(language) in (2, 3)):
                raise ValueError(f"language {language!r} is not an ISO 639-1 code like 'de'")
        return languages

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        if "st" in self.settings and "st" not in self.tasks:
            raise ValueError("setting 'st' needs task 'st' in tasks")
        if "asr" in self.settings and "asr" not in self.tasks:
            raise ValueError("setting 'asr' needs task 'asr' in tasks")
        if self.extensibility and self.extensibility.language not in self.languages:
            raise ValueError("extensibility.language must be one of languages")
        if self.extensibility and len(self.languages) < 2:
            raise ValueError("extensibility needs at least two languages")
        if "mtl_plateau" in self.baselines and self.training.patience is None:
            raise ValueError("baseline mtl_plateau trains MTL to its own dev plateau: set "
                             "training.patience (dev evaluations without improvement)")
        if self.search.equal_budget:
            self._check_equal_budget()
        return self

    def _check_equal_budget(self) -> None:
        sizes = {method: len(self.grid(method)) for method in self.methods
                 if _tunable(method)}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{m} {n}" for m, n in sizes.items())
            raise ValueError(f"search.equal_budget: the grids have different numbers of points "
                             f"({listed}); give every method the same number, or set "
                             "search.equal_budget: false")

    def grid(self, method: str) -> list[dict]:
        """Every point of ``method``'s grid, lambda last so points differ only in it last."""
        spec = self.methods[method]
        keys = sorted(spec, key=lambda k: (k == "lambda", k))
        values = [v if isinstance(v, list) else [v] for v in (spec[k] for k in keys)]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]

    def group_ops(self) -> dict[str, str]:
        """The per-group op overrides every merge of this experiment uses (see non_matrix)."""
        if self.non_matrix == "method":
            return {}
        return {group: self.non_matrix for group in GROUPS if group not in MATRIX_GROUPS}

    def pairs(self) -> list[tuple[str, str]]:
        return [(language, task) for language in self.languages for task in self.tasks]

    def setting_pairs(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        """(setting id, title, pairs) for every configured setting (multitask: per language)."""
        out = []
        for setting in self.settings:
            if setting == "multitask":
                for language in self.languages:
                    out.append((f"multitask-{language}",
                                SETTING_TITLES["multitask"].format(language=language),
                                [(language, task) for task in self.tasks]))
            else:
                pairs = [p for p in self.pairs() if setting == "all" or p[1] == setting]
                out.append((setting, SETTING_TITLES[setting], pairs))
        return out


def _tunable(method: str) -> bool:
    """Whether any op of ``method`` reads a parameter (the plain average reads none)."""
    name = METHOD_ALIASES.get(method, (method,))[0]
    spec = METHODS.get(name)
    return spec is None or bool(OPS[spec.matrix_op].parameters | OPS[spec.other_op].parameters)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts: the cache key of a stage.

    The lors version is part of every key, so an upgrade never reuses results that an older
    release computed (possibly with other semantics); within a release the cache is reused.
    """
    text = json.dumps([__version__, parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def check_methods(config: ExperimentConfig) -> None:
    """ConfigError for an unknown method or a parameter the method does not read, per point."""
    for method in config.methods:
        for point in config.grid(method):
            validate_and_resolve(method, point, experts=2, source=f"methods.{method}",
                                 groups=config.group_ops())


def validate_and_resolve(method: str, params: dict, experts: int, source: str,
                         groups: dict[str, str] | None = None
                         ) -> tuple[str, dict, dict[str, str]]:
    """The engine's (method, parameters, op per group) for ``experts`` experts, without files."""
    raw = {"base": "unused", "method": method, "parameters": params, "groups": groups or {},
           "experts": [{"name": f"e{i}", "path": "unused"} for i in range(experts)]}
    return resolve(validate_config(raw, source=source))


def load_experiment(path: str | Path | None = None, **overrides) -> ExperimentConfig:
    """Read and validate an experiment YAML (ConfigError naming the file and field)."""
    raw: dict = {}
    source = "experiment config"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read experiment config {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: an experiment config is a mapping of settings")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"{source}: invalid experiment config: {problems}") from None
    check_methods(config)
    return config
