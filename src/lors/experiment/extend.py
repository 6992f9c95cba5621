"""Extensibility: add one language to an existing LoRS merge, versus re-merging and MTL.

The existing merge is built as a user would have built it before the language existed: its
own dev search over the LoRS grid on the other languages' experts and dev sets only (it never
sees the new language), scored on test on those pairs. Adding the language then needs no
search: LoRS prunes every expert on its own and merges base + lambda * sum of the pruned task
vectors, so with S_old = (theta_old - theta_0) / lambda_old the extended model is
theta_0 + lambda_new * (S_old + sum_new tau'), with the existing rank and keep and
lambda_new = lambda_old * T_old / T (each expert keeps the weight it had). Groups that lambda
does not scale (the mean) become the mean over all T experts. This is compared with
re-merging all experts from scratch (the setting's full dev search and merge) and with
retraining the MTL model on every language (a new MTL run, not a continuation).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint.reader import open_checkpoint
from ..fsutil import atomic_directory
from ..training.modes import export_model, load_whisper
from .config import digest, validate_and_resolve
from .intervals import bootstrap_normalised
from .normalised import normalised_performance
from .search import SettingSearch, best_point
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


def _scored(exp, name: str, model: str | Path, pairs, expert_test) -> dict:
    """``model``'s normalised % on ``pairs`` and its 90 % bootstrap interval (over the test
    utterances, resampled jointly with the experts', as every other table's)."""
    evaluation = exp.test_results(name, model, pairs)
    results = [{k: v for k, v in r.items() if k != "utterances"} for r in evaluation["results"]]
    scored = {"normalised": normalised_performance(results, expert_test)["percent"]}
    records = {(r["language"], r["task"]): r.get("utterances") for r in evaluation["results"]}
    experts = {tuple(pair): expert_test[tuple(pair)].get("utterances") for pair in pairs}
    if all(experts.values()) and all(records.get(pair) for pair in experts):
        scored["normalised_interval"] = bootstrap_normalised(
            {name: records}, experts)[name]["normalised_interval"]
    return scored


def _add(exp, existing: Path, new: dict[str, str], params: dict, lam_old: float,
         counts: tuple[int, int], out: Path) -> None:
    """Write the existing merge extended by the ``new`` experts (see the module docstring)."""
    old_count, all_count = counts
    lam_new = lam_old * old_count / all_count
    vectors = TaskVectors(str(exp.base), new)
    delta = vectors.delta("lors", {k: v for k, v in params.items() if k != "lambda"},
                          exp.config.group_ops())
    old_model = open_checkpoint(str(existing))
    state = {}
    for name, base_tensor in vectors.base.items():
        merged = old_model.read(name).float()
        if name in delta.combined:
            if delta.scaled[name]:
                summed = (merged - base_tensor) / lam_old + delta.combined[name]
                merged = base_tensor + lam_new * summed
            else:  # a mean over the old experts becomes the mean over all of them
                merged = base_tensor + ((merged - base_tensor) * old_count
                                        + delta.combined[name] * (all_count - old_count)
                                        ) / all_count
        state[name] = merged
    _write_state(exp.base, state, out)


def extensibility(exp, language: str, experts: dict, expert_test: dict,
                  settings: list[dict]) -> dict | None:
    setting = _setting_with(settings, language)
    if setting is None or "lors" not in exp.config.methods:
        return None
    pairs = [tuple(p) for p in setting["pairs"]]
    old_pairs = [p for p in pairs if p[0] != language]
    new_pairs = [p for p in pairs if p[0] == language]
    rows = {m["name"]: m for m in setting["models"]}
    without = f"{setting['name']}-without-{language}"

    search = SettingSearch(exp, without, old_pairs, experts)
    points = search.points("lors", exp.config.grid("lors"))
    params = best_point(points)["params"]
    existing = exp.merged(without, "lors", params, search.expert_paths)
    existing_cost = sum(p["seconds"] for p in points) + existing["merge_s"]
    groups = exp.config.group_ops()
    lam_old = validate_and_resolve("lors", params, len(old_pairs), "extensibility",
                                   groups)[1]["lambda"]
    lam_new = lam_old * len(old_pairs) / len(pairs)
    new = {f"{l}-{t}": experts[(l, t)]["path"] for l, t in new_pairs}
    new_training = sum(experts[p]["train_s"] for p in new_pairs)
    out = exp.model_path(f"extend-{setting['name']}-add-{language}",
                         digest(exp.train_key, params, groups))

    def add() -> dict:
        started = time.perf_counter()
        _add(exp, Path(existing["path"]), new, params, lam_old, (len(old_pairs), len(pairs)),
             out)
        return {"path": str(out), "add_s": time.perf_counter() - started}
    cost = cached_json(out.with_name(out.name + ".cost.json"), add)

    rows_out = [
        {"name": f"existing merge without {language} (its own dev search; on its "
                 f"{len(old_pairs)} pairs)",
         **_scored(exp, f"extend-existing-{without}", existing["path"], old_pairs,
                   expert_test),
         "cost_s": existing_cost},
        {"name": f"add {language} to it (prune only the new experts; lambda "
                 f"{lam_old:g} x {len(old_pairs)}/{len(pairs)}, no search)",
         **_scored(exp, f"extend-add-{language}", out, pairs, expert_test),
         "cost_s": cost["add_s"] + new_training}]
    if "lors" in rows:
        rows_out.append({"name": "re-merge all from scratch (dev search + merge)",
                         "normalised": rows["lors"]["normalised"],
                         "normalised_interval": rows["lors"].get("normalised_interval"),
                         "cost_s": rows["lors"]["cost"]["merge_s"] + new_training})
    if "mtl" in rows:
        rows_out.append({"name": "retrain the MTL model on every language (a new run)",
                         "normalised": rows["mtl"]["normalised"],
                         "normalised_interval": rows["mtl"].get("normalised_interval"),
                         "cost_s": rows["mtl"]["cost"]["train_s"]})
    added_params = {**params, "lambda": lam_new}
    same = exp.merged(f"extend-{setting['name']}-remerge", "lors", added_params,
                      {**search.expert_paths, **new})
    a, b = open_checkpoint(str(out)), open_checkpoint(same["path"])
    diff = max(float((a.read(n).float() - b.read(n).float()).abs().max()) for n in a.meta
               if n in b.meta and a.meta[n].dtype.is_floating_point)
    note = (f"The existing merge chose {params} on dev without {language}. Costs: the "
            f"existing merge's search + merge; adding and re-merging include training the new "
            f"experts ({new_training:.0f} s); MTL is a new run on every language. The added "
            f"model re-merged from scratch with the same hyper-parameters (lambda {lam_new:g}) "
            f"differs by at most {diff:.2e} in any weight (the randomized SVD's sketch is "
            "seeded per expert position).")
    return {"language": language, "setting": setting["name"], "params": params,
            "added_params": added_params, "rows": rows_out, "note": note}
