"""Extensibility: add one language to an existing LoRS merge, versus re-merging and MTL.

LoRS prunes every expert on its own and the merge is base + lambda * sum of the pruned task
vectors, so adding a language needs only its experts pruned: with S_old = (theta_old -
theta_0) / lambda_old, the extended model is theta_0 + lambda_new * (S_old + sum_new tau').
That equals re-merging all experts with the same hyper-parameters (up to the randomized SVD's
sketch, which is seeded per expert position). It is compared with re-merging from scratch (a
new dev search, then the merge) and with retraining the MTL model on every language.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint.reader import open_checkpoint
from ..fsutil import atomic_directory
from ..training.modes import export_model, load_whisper
from .config import digest, validate_and_resolve
from .normalised import normalised_performance
from .stages import cached_json
from .taskvectors import TaskVectors


def _setting_with(settings: list[dict], language: str) -> dict | None:
    """The setting with most pairs that holds ``language`` and at least one other language."""
    fitting = [s for s in settings if any(p[0] == language for p in s["pairs"])
               and any(p[0] != language for p in s["pairs"])]
    return max(fitting, key=lambda s: len(s["pairs"]), default=None)


def _write_state(base: Path, state: dict, out: Path) -> None:
    """Save ``state`` as a Whisper folder of the base's shape at ``out`` (``atomic_directory``;
    a folder already there, from a run killed before its cost was recorded, is replaced)."""
    whisper, _ = load_whisper(base)
    whisper.load_state_dict(state, strict=False)
    whisper.tie_weights()
    with atomic_directory(out, force=True) as tmp:
        export_model(whisper, "full", base, tmp)


def extensibility(exp, language: str, experts: dict, expert_test: dict,
                  settings: list[dict]) -> dict | None:
    setting = _setting_with(settings, language)
    if setting is None:
        return None
    pairs = [tuple(p) for p in setting["pairs"]]
    rows = {m["name"]: m for m in setting["models"]}
    params = dict(rows["lors"]["params"]) if "lors" in rows else {}
    old = {f"{l}-{t}": experts[(l, t)]["path"] for l, t in pairs if l != language}
    new = {f"{l}-{t}": experts[(l, t)]["path"] for l, t in pairs if l == language}
    existing = exp.merged(f"{setting['name']}-without-{language}", "lors", params, old)
    lam_old = validate_and_resolve("lors", params, len(old), "extensibility")[1]["lambda"]
    lam_all = validate_and_resolve("lors", params, len(pairs), "extensibility")[1]["lambda"]
    out = exp.model_path(f"extend-{setting['name']}-add-{language}",
                         digest(exp.train_key, params))

    def add() -> dict:
        started = time.perf_counter()
        vectors = TaskVectors(str(exp.base), new)
        delta = vectors.delta("lors", {k: v for k, v in params.items() if k != "lambda"})
        old_ckpt = open_checkpoint(existing["path"])
        state = {}
        for name, base_tensor in vectors.base.items():
            merged = old_ckpt.read(name).float()
            if name in delta.combined:
                summed = (merged - base_tensor) / lam_old + delta.combined[name]
                merged = base_tensor + lam_all * summed
            state[name] = merged
        _write_state(exp.base, state, out)
        return {"path": str(out), "add_s": time.perf_counter() - started}
    cost = cached_json(out.with_name(out.name + ".cost.json"), add)
    added = exp.test_results(f"extend-add-{language}", out, pairs)
    results = [{k: v for k, v in r.items() if k != "utterances"} for r in added["results"]]
    rows_out = [{"name": "add to existing merge (prune only the new experts)",
                 "normalised": normalised_performance(results, expert_test)["percent"],
                 "cost_s": cost["add_s"]}]
    if "lors" in rows:
        rows_out.append({"name": "re-merge from scratch (dev search + merge)",
                         "normalised": rows["lors"]["normalised"],
                         "cost_s": rows["lors"]["cost"]["merge_s"]})
    if "mtl" in rows:
        rows_out.append({"name": "retrain the MTL model on every language",
                         "normalised": rows["mtl"]["normalised"],
                         "cost_s": rows["mtl"]["cost"]["train_s"]})
    note = None
    if "lors" in rows:
        a = open_checkpoint(str(out))
        b = open_checkpoint(str(exp.merge_path(setting["name"], "lors", params)))
        diff = max(float((a.read(n).float() - b.read(n).float()).abs().max()) for n in a.meta
                   if n in b.meta)
        note = (f"max |added - re-merged with the same hyper-parameters| over all weights: "
                f"{diff:.2e}")
    return {"language": language, "setting": setting["name"], "params": params, "rows": rows_out,
            "note": note}

