"""The package's face: ``from lors import merge, train, evaluate, run_experiment``.

Each accepts what a user has at hand (a config object, a plain dict, or a YAML path) and
calls the one implementation behind the matching CLI command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .evaluation import evaluate


def merge(config: Any, out: str | Path, *, force: bool = False, diagnostics: bool = True,
          progress=None, workers: int | None = None, device: str | None = None) -> dict:
    """Merge as ``config`` says (a ``MergeConfig``, a dict, or a YAML path) into the new
    directory ``out``, as ``lors merge`` does (``device``: cpu, cuda or cuda:N, as
    ``--device``); returns the merge report."""
    from .merging import MergeConfig, load_config, validate_config
    from .merging import merge as merge_config
    if isinstance(config, (str, Path)):
        config = load_config(Path(config))
    elif not isinstance(config, MergeConfig):
        config = validate_config(config, source="merge config")
    return merge_config(config, Path(out), force=force, diagnostics=diagnostics,
                        progress=progress, workers=workers, device=device)


def train(config: Any = None, **settings) -> dict:
    """Train an expert, the MTL model or a sequential model, as ``lors train`` does:
    ``config`` is a ``TrainConfig`` or a dict, or give its fields as keywords
    (``train(pairs=[("de", "asr")], out="runs/de-asr")``); returns the training summary."""
    from .training import TrainConfig
    from .training import train as train_config
    if not isinstance(config, TrainConfig):
        config = TrainConfig(**{**(config or {}), **settings})
    return train_config(config)


def run_experiment(config: Any, *, show_progress: bool = True, **overrides) -> dict:
    """Run (or resume) the experiment of ``config`` (an ``ExperimentConfig``, a dict, or a
    YAML path; ``overrides`` such as ``out=`` or ``base=`` replace its fields), as
    ``lors experiment`` does; returns the experiment record with the report's paths."""
    from .experiment.config import ExperimentConfig, load_experiment
    from .experiment.runner import run_experiment as run
    if isinstance(config, (str, Path)):
        config = load_experiment(config, **overrides)
    elif isinstance(config, (dict, ExperimentConfig)):
        raw = config.model_dump() if isinstance(config, ExperimentConfig) else config
        config = load_experiment(None, **{**raw, **overrides})  # validated again
    else:
        raise TypeError("run_experiment takes an ExperimentConfig, a dict or a YAML path")
    return run(config, show_progress=show_progress)


__all__ = ["evaluate", "merge", "run_experiment", "train"]
