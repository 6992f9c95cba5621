"""The experiment's cached stages: train, evaluate, search, merge.

Every stage's output lives under the experiment folder at a path named by a hash of its
inputs, and is written atomically (models through ``train``/``merge``, JSON through
``atomic_file``). A stage whose output exists is skipped, so an interrupted experiment
resumes where it stopped and changing a merge hyper-parameter re-runs only the search and
merges: the experts' path depends only on the data and the training recipe. A stage is
computed under its lock file (:mod:`.locks`), so workers sharing the folder (``lors
experiment --jobs``, Ray, SLURM: :mod:`.parallel`) compute each stage once.
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
from .locks import stage_lock


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    """``path``'s JSON if it exists; else ``compute()``, written atomically and returned.

    Computed under the stage's lock (:mod:`.locks`): a worker that needs a stage another
    worker is computing waits for it instead of computing it too."""
    path = Path(path)
    if path.is_file():
        return _read_json(path)
    with stage_lock(path, path.is_file) as mine:
        if not mine or path.is_file():  # another worker computed it meanwhile
            return _read_json(path)
        value = compute()
        _write_json(path, value)
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: dict) -> None:
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")


def cached_model(path: Path, build: Callable[[], None], cost_key: str,
                 device: str | None = None) -> dict:
    """Build the model folder ``path`` unless it and its cost file exist; return
    ``{"path", cost_key: seconds, "device"}``, stored beside the model so a cached model keeps
    its cost (wall-clock time of ``build``)."""
    path = Path(path)
    cost_file = path.with_name(path.name + ".cost.json")

    def done() -> bool:
        return path.is_dir() and cost_file.is_file()
    if done():
        return _read_json(cost_file)
    with stage_lock(cost_file, done) as mine:
        if not mine or done():  # another worker built it meanwhile
            return _read_json(cost_file)
        cost_file.unlink(missing_ok=True)  # a cost without its model (deleted by hand) is stale
        started = time.perf_counter()
        build()
        value = {"path": str(path), cost_key: time.perf_counter() - started,
                 "device": device or device_name()}
        _write_json(cost_file, value)
    return value


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
