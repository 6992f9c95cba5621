"""The embedded default experiment behind ``lors demo`` (demo.yaml beside this file)."""

from __future__ import annotations

from importlib import resources

import yaml

from .config import ExperimentConfig, load_experiment

QUICK = {"data": {"train_per_pair": 8, "dev_per_pair": 2, "test_per_pair": 2},
         "training": {"max_steps": 2, "eval_every": 2},
         "methods": {"lors": {"rank": 4, "keep": 0.2, "lambda": [0.25, 0.5]},
                     "task_arithmetic": {"lambda": [0.25, 0.5]},
                     "ties": {"keep": 0.2, "lambda": [0.5, 1.0]}}}
"""The --quick overrides: the same stages on a handful of sentences (a smoke run)."""


def demo_config(quick: bool = False, out: str | None = None,
                base: str | None = None) -> ExperimentConfig:
    """The packaged demo config; ``quick`` shrinks data, steps and grids, and defaults the
    output folder to runs/demo-quick so it never mixes with a full demo's cache."""
    path = resources.files("lors.experiment") / "demo.yaml"
    if not quick:
        return load_experiment(str(path), out=out, base=base)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in QUICK.items():
        raw[key] = {**raw.get(key, {}), **value} if key != "methods" else value
    raw["out"] = out or "runs/demo-quick"
    if base:
        raw["base"] = base
    return load_experiment(None, **raw)
