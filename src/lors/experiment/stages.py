"""The experiment's cached stages: train, evaluate, search, merge.

Every stage's output lives under the experiment folder at a path named by a hash of its
inputs, and is written atomically (models through ``train``/``merge``, JSON through
``atomic_file``). A stage whose output exists is skipped, so an interrupted experiment
resumes where it stopped and changing a merge hyper-parameter re-runs only the search and
merges: the experts' path depends only on the data and the training recipe.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..evaluation import evaluate
from ..fsutil import atomic_file
from ..training import TrainConfig, train


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """``path``'s JSON if it exists; else ``compute()``, written atomically and returned."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    return value


def cached_model(path: Path, build: Callable[[], None], cost_key: str,
                 device: str | None = None) -> dict:
    """Build the model folder ``path`` unless it and its cost file exist; return
    ``{"path", cost_key: seconds, "device"}``, stored beside the model so a cached model keeps
    its cost (wall-clock time of ``build``)."""
    cost_file = path.with_name(path.name + ".cost.json")
    if path.is_dir() and cost_file.is_file():
        return json.loads(cost_file.read_text())

    def run() -> dict:
        started = time.perf_counter()
        build()
        return {"path": str(path), cost_key: time.perf_counter() - started,
                "device": device or device_name()}
    cost_file.unlink(missing_ok=True)  # a cost without its model (deleted by hand) is stale
    return cached_json(cost_file, run)


def trained_model(path: Path, config: TrainConfig, utterances: list) -> dict:
    """Train ``config`` into ``path`` unless done; ``{"path", "train_s", "device"}`` (data
    preparation, training, dev checks and saving) plus, from the model's training.json,
    ``steps`` (optimizer steps taken), ``samples``, ``stopped_early`` (on a dev plateau),
    ``dev_curve`` ([step, dev score] per dev evaluation; a sequential model's stages one
    after another, each on its own pair, and ``dev_seen_curve`` on every pair seen so far),
    ``select`` (the dev score's name), ``best_step``, ``best_dev_score`` and
    ``best_dev_pairs`` (per pair at the best step; None for a sequential model)."""
    info = cached_model(path, lambda: train(config, utterances=utterances), "train_s")
    summary = json.loads((Path(path) / "training.json").read_text(encoding="utf-8"))
    single = not summary.get("sequential")
    facts = {"steps": summary.get("steps"), "samples": summary.get("samples"),
             "stopped_early": summary.get("stopped_early", False),
             "dev_curve": summary.get("dev_curve", []), "select": summary.get("select"),
             **{key: summary.get(key) if single else None
                for key in ("best_step", "best_dev_score", "best_dev_pairs")}}
    if not single:
        facts["dev_seen_curve"] = summary.get("dev_seen_curve", [])
    return {**info, **facts}


def evaluated(path: Path, model: str | Path, utterances: list, pairs: list[tuple[str, str]],
              spec) -> dict:
    """Test-set results of ``model`` on ``pairs`` (each pair on its language's clips)."""
    def run() -> dict:
        started, results = time.perf_counter(), []
        for language, task in pairs:
            clips = [u for u in utterances if u.language == language]
            report = evaluate(model, clips, languages=[language], tasks=[task],
                              batch_size=spec.batch_size, num_beams=spec.num_beams,
                              max_new_tokens=spec.max_new_tokens, device=device_name())
            results += report["results"]
            results[-1]["utterances"] = [{k: u[k] for k in ("id", "reference", "hypothesis")}
                                         for u in report["utterances"]]
        return {"model": str(model), "results": results,
                "eval_s": time.perf_counter() - started, "device": device_name()}
    return cached_json(path, run)
