"""Training settings, validated before any data or model is loaded."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import ConfigError

Mode = Literal["full", "freeze-encoder", "lora"]

DEFAULT_LEARNING_RATE: dict[str, float] = {"full": 1e-5, "freeze-encoder": 1e-5, "lora": 5e-4}
"""Per mode: the paper's 1e-5 for full fine-tuning and the frozen encoder; LoRA's few
adapter weights start at zero and need a larger step (a common choice for Whisper LoRA)."""


class TrainConfig(BaseModel):
    """Everything that decides what a training run computes (plus how it reports).

    ``pairs`` is the ordered list of (language, task) pairs: one pair trains an expert,
    several the multi-task multi-lingual model (balanced sampling), or, with ``sequential``,
    one model on each pair in turn. ``max_steps`` wins over ``epochs`` (counted on the
    largest pair) and is the cap of the run. The dev set is scored ``eval_times`` times spread
    evenly over the (capped) run when given, else every ``eval_every`` steps (default a tenth
    of the steps) and at the last step; checkpoints are saved at those evaluations unless
    ``save_every`` is given. ``patience``: stop once the dev score has not improved for that
    many consecutive dev evaluations (None: train to the cap).

    ``batch_size`` is the global batch of one optimizer step: under several processes
    (``accelerate launch``, ``torchrun``) it is split across them, so a run gives the same
    result (up to float rounding) whatever the number of processes. ``mixed_precision``
    None takes the launcher's setting (``accelerate launch --mixed_precision``), else no.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    manifest: str | None = None
    pairs: list[tuple[str, str]]
    out: str
    sequential: bool = False
    mode: Mode = "full"
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float = Field(default=5.0, gt=0)
    batch_size: int = Field(default=8, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)  # gradient clipping; None: off
    seed: int = 0
    eval_every: int | None = Field(default=None, ge=1)
    eval_times: int | None = Field(default=None, ge=1)  # wins over eval_every
    patience: int | None = Field(default=None, ge=1)  # in dev evaluations; None: off
    save_every: int | None = Field(default=None, ge=1)
    select: Literal["token-accuracy", "wer-bleu"] = "token-accuracy"
    limit: int | None = Field(default=None, ge=1)
    dev_limit: int | None = Field(default=None, ge=1)
    max_missing_fraction: float = Field(default=0.1, ge=0, le=1)
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # None: the launcher's, else no
    cpu: bool = False
    cache_dir: str | None = None
    force: bool = False
    show_progress: bool = True

    @field_validator("pairs")
    @classmethod
    def _pairs_known(cls, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not pairs:
            raise ValueError("no (language, task) pairs selected")
        for language, task in pairs:
            if task not in ("asr", "st"):
                raise ValueError(f"unknown task {task!r} (tasks are 'asr' and 'st')")
            if not language.isalpha() or not language.islower() or len(language) not in (2, 3):
                raise ValueError(f"language {language!r} is not an ISO 639-1 code like 'de'")
            if task == "st" and language == "en":
                raise ValueError("st translates into English; English has no st pair")
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"a (language, task) pair is repeated in {pairs}")
        return pairs

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.mode]

    def fingerprint(self, **extra) -> str:
        """A digest of the settings that change the trained weights (not out, force, ...)."""
        ignored = {"out", "force", "show_progress", "cache_dir"}
        payload = {k: v for k, v in self.model_dump().items() if k not in ignored}
        payload.update(extra)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str)
                              .encode()).hexdigest()[:16]


def parse_pairs(languages: list[str] | None, tasks: list[str] | None,
                pairs: list[str] | None = None) -> list[tuple[str, str]]:
    """Pairs from ``--pairs de-asr,fr-st`` or the product languages x tasks (language-major)."""
    if pairs:
        if languages or tasks:
            raise ConfigError("give either --pairs or --languages/--tasks, not both")
        parsed = []
        for item in pairs:
            language, _, task = item.partition("-")
            if not task:
                raise ConfigError(f"pair {item!r} is not LANGUAGE-TASK, e.g. de-asr")
            parsed.append((language, task))
        return parsed
    if not languages:
        raise ConfigError("no languages selected; pass --languages, e.g. --languages de,fr")
    return [(language, task) for language in languages for task in (tasks or ["asr"])]
