"""``run_experiment``: the paper's pipeline on one config, every stage cached.

base (zero-shot) -> experts per (language, task) -> MTL and sequential models per setting ->
dev search of every merge method (decompositions computed once) -> the chosen merges, written
by the streaming engine -> test evaluation of everything -> normalised performance ->
extensibility -> report (markdown, HTML, plots).

``lors experiment --jobs N`` (or ``--executor ray|slurm``) first computes the independent
stages in parallel (:mod:`.parallel`, through the helpers below), then runs this same
function, which finds every stage cached.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..base import resolve_model_reference
from ..checkpoint.reader import open_checkpoint
from ..data.manifest import read_manifest
from ..data.synth import RENDER_VERSION
from ..errors import LorsError
from ..evaluation.decode import check_references
from ..fsutil import atomic_file
from ..merging import merge, validate_config
from ..training import TrainConfig
from ..training.api import check_base_knows, default_speech
from ..training.data import disjoint_training, select
from .config import ExperimentConfig, digest
from .extend import extensibility
from .intervals import bootstrap_normalised
from .normalised import normalised_performance
from .report import format_summary_table, write_report
from .search import SettingSearch, best_point
from .stages import cached_json, cached_model, device_name, evaluated, trained_model


class Experiment:
    """The resolved inputs of one experiment and the paths of its stages."""

    def __init__(self, config: ExperimentConfig, show_progress: bool = True) -> None:
        self.config, self.show = config, show_progress
        self.out = Path(config.out)
        self.base = Path(resolve_model_reference(config.base))
        check_base_knows(self.base, config.pairs())
        manifest = config.data.manifest or default_speech(config.languages, show_progress,
                                                          config.data.augment)
        utterances = read_manifest(manifest)
        if config.data.disjoint_languages:
            utterances = disjoint_training(utterances, config.languages, str(manifest),
                                           config.data.train_per_pair)
        self.selection = select(utterances, config.pairs(), str(manifest),
                                limit=config.data.train_per_pair,
                                dev_limit=config.data.dev_per_pair)
        self.test = {}
        for language, task in config.pairs():
            clips = [u for u in utterances if u.language == language and u.split == "test"]
            clips = clips[:config.data.test_per_pair]
            if not clips:
                raise LorsError(f"no test utterances for {language} in {manifest}")
            check_references(clips, task, str(manifest))
            self.test[(language, task)] = clips
        self.utterances = list({u.id: u for u in self.selection.utterances
                                + [c for cs in self.test.values() for c in cs]}.values())
        # the rendering's version too: the same ids with other voices are other data
        speech = None if config.data.manifest else RENDER_VERSION
        self.data_key = digest(open_checkpoint(str(self.base)).fingerprint(),
                               [u.id for u in self.utterances],
                               config.data.model_dump(), speech)
        self.train_key = digest(self.data_key, config.training.model_dump())
        self.eval_key = digest(self.data_key, config.evaluation.model_dump())

    # --- paths -----------------------------------------------------------------------
    def model_path(self, name: str, key: str) -> Path:
        return self.out / "models" / f"{name}-{key}"

    def train_config(self, pairs, out: Path, **extra) -> TrainConfig:
        spec = self.config.training
        values = dict(base=str(self.base), pairs=pairs, out=str(out), mode=spec.mode,
                      max_steps=spec.max_steps, epochs=spec.epochs, batch_size=spec.batch_size,
                      learning_rate=spec.learning_rate, seed=spec.seed, select=spec.select,
                      eval_every=spec.eval_every, eval_times=spec.eval_times,
                      patience=spec.patience, save_every=spec.save_every,
                      mixed_precision=spec.mixed_precision,
                      limit=self.config.data.train_per_pair,
                      dev_limit=self.config.data.dev_per_pair,
                      cache_dir=str(self.out / "cache"), show_progress=self.show)
        return TrainConfig(**{**values, **extra})

    def test_results(self, name: str, model: str | Path, pairs) -> dict:
        # the asr and st pairs of a language share its clips: each clip once, not once per pair
        clips = list({c.id: c for pair in pairs for c in self.test[tuple(pair)]}.values())
        path = self.out / "eval" / f"{name}-{digest(str(model), pairs, self.eval_key)}.json"
        if self.show and not path.is_file():
            print(f"  evaluate {name} on test ({len(pairs)} pairs)", flush=True)
        return evaluated(path, model, clips, pairs, self.config.evaluation)

    # --- stages ----------------------------------------------------------------------
    def expert(self, pair) -> dict:
        path = self.model_path(f"expert-{pair[0]}-{pair[1]}", self.train_key)
        return trained_model(path, self.train_config([pair], path), self.utterances)

    def mtl(self, setting: str, pairs) -> dict:
        """The MTL model on equal compute: exactly as many optimizer steps (and samples) as
        the setting's experts took together, read from their training.json (so also right
        with epochs on pairs of unequal size, or experts stopped on a plateau); no plateau
        stopping of its own."""
        steps = sum(self.expert(pair)["steps"] for pair in pairs)
        path = self.model_path(f"mtl-{setting}", digest(self.train_key, steps))
        config = self.train_config(pairs, path, max_steps=steps, patience=None)
        return trained_model(path, config, self.utterances)

    def mtl_plateau(self, setting: str, pairs) -> dict:
        """The MTL model trained to its own dev plateau, with the experts' patience; the cap
        is the experts' epochs x the number of pairs (with max_steps: max_steps x pairs x
        pairs, the same multiple of an expert's run), so the plateau, not the cap, ends it."""
        spec = self.config.training
        if spec.patience is None:
            raise LorsError("baseline mtl_plateau trains to a dev plateau: set "
                            "training.patience (dev evaluations without improvement)")
        path = self.model_path(f"mtl_plateau-{setting}", self.train_key)
        cap = ({"max_steps": spec.max_steps * len(pairs) ** 2} if spec.max_steps
               else {"epochs": spec.epochs * len(pairs)})
        return trained_model(path, self.train_config(pairs, path, **cap), self.utterances)

    def sequential(self, setting: str, pairs) -> dict:
        path = self.model_path(f"sequential-{setting}", self.train_key)
        return trained_model(path, self.train_config(pairs, path, sequential=True),
                             self.utterances)

    def merge_path(self, setting: str, method: str, params: dict) -> Path:
        return self.model_path(f"merge-{setting}-{method}",
                               digest(self.train_key, params, self.config.group_ops()))

    def merged(self, setting: str, method: str, params: dict, experts: dict[str, str]) -> dict:
        path = self.merge_path(setting, method, params)
        config = validate_config({"base": str(self.base), "method": method, "parameters": params,
                                  "groups": self.config.group_ops(),
                                  "experts": [{"name": n, "path": p} for n, p in experts.items()]})
        return cached_model(path, lambda: merge(config, path, force=True, progress=False),
                            "merge_s", device="cpu")  # the streaming engine runs on CPU


def run_experiment(config: ExperimentConfig, show_progress: bool = True) -> dict:
    """Run (or resume) the experiment; write ``experiment.json`` and the report; return it."""
    exp = Experiment(config, show_progress)
    say = print if show_progress else (lambda *a, **k: None)
    pairs = config.pairs()
    base_eval = exp.test_results("base", exp.base, pairs)
    experts, expert_eval = {}, {}
    for pair in pairs:
        say(f"expert {pair[0]}-{pair[1]}")
        experts[pair], expert_eval[pair] = expert_results(exp, pair)
    expert_test = {pair: expert_eval[pair]["results"][0] for pair in pairs}
    training = [{"name": f"expert {l}-{t}", "kind": "expert", "setting": None,
                 "pairs": [[l, t]], **experts[(l, t)]} for l, t in pairs]
    settings, sweeps, cosines = [], [], []
    for setting, title, setting_pairs in config.setting_pairs():
        say(f"setting {setting}: {', '.join('-'.join(p) for p in setting_pairs)}")
        models = [_row("base", "zero-shot", base_eval, setting_pairs, expert_test),
                  _expert_row(setting_pairs, experts, expert_eval, expert_test)]
        for baseline in config.baselines:
            if len(setting_pairs) < 2:
                continue
            trained, result = baseline_results(exp, baseline, setting, setting_pairs)
            training.append({"name": baseline, "kind": baseline, "setting": setting,
                             "pairs": [list(p) for p in setting_pairs], **trained})
            models.append(_row(baseline, baseline, result, setting_pairs, expert_test,
                               train_s=trained["train_s"]))
        search = SettingSearch(exp, setting, setting_pairs, experts)
        names = search.expert_paths
        for method in config.methods:
            say(f"  search {method}")
            points, best, merged, result = method_results(exp, search, method)
            sweeps += points
            search_s = sum(p["seconds"] for p in points)
            models.append(_row(method, "merge", result, setting_pairs, expert_test,
                               params=best["params"], merge_s=merged["merge_s"] + search_s,
                               train_s=sum(experts[p]["train_s"] for p in setting_pairs)))
        matrix = setting_cosines(exp, search)
        cosines.append({"setting": setting, "labels": list(names), "matrix": matrix})
        _add_intervals(models, setting_pairs, expert_test)
        settings.append({"name": setting, "title": title, "pairs": [list(p) for p in setting_pairs],
                         "models": models})
    experiment = {"name": config.name, "size": _size(exp), "settings": settings,
                  "training": training,
                  "sweeps": sweeps, "cosines": cosines, "notes": _notes(exp)}
    if config.extensibility is not None:
        experiment["extensibility"] = extensibility(exp, config.extensibility.language, experts,
                                                    expert_test, settings)
    with atomic_file(exp.out / "experiment.json", "w", encoding="utf-8") as handle:
        handle.write(json.dumps(experiment, indent=2, default=str) + "\n")
    experiment["report"] = {k: str(v) if not isinstance(v, list) else [str(x) for x in v]
                            for k, v in write_report(experiment, exp.out / "report").items()}
    return experiment


# --- the stages of one experiment, shared by run_experiment and the parallel scheduler ------
# (.parallel computes them in worker processes first; run_experiment then finds them cached)

def expert_results(exp: Experiment, pair) -> tuple[dict, dict]:
    """The expert of ``pair`` (trained) and its test evaluation."""
    pair = tuple(pair)
    expert = exp.expert(pair)
    return expert, exp.test_results(f"expert-{pair[0]}-{pair[1]}", expert["path"], [pair])


def baseline_results(exp: Experiment, baseline: str, setting: str, pairs) -> tuple[dict, dict]:
    """The ``baseline`` model of ``setting`` (mtl, mtl_plateau, sequential) and its test
    evaluation."""
    trained = getattr(exp, baseline)(setting, pairs)
    return trained, exp.test_results(f"{baseline}-{setting}", trained["path"], pairs)


def setting_search(exp: Experiment, setting: str, pairs) -> SettingSearch:
    """The setting's dev search (its experts' dev scores computed on creation)."""
    return SettingSearch(exp, setting, pairs, {tuple(p): exp.expert(tuple(p)) for p in pairs})


def method_results(exp: Experiment, search: SettingSearch, method: str
                   ) -> tuple[list[dict], dict, dict, dict]:
    """``method``'s dev search in ``search``'s setting, its chosen merge and that merge's test
    evaluation: (points, best point, merge cost record, test results)."""
    config = exp.config
    points = search.points(method, config.grid(method), config.search.widen_edges)
    if config.search.block_lambdas:
        points += search.block_lambdas(method, points, config.search.block_lambdas)
    best = best_point(points)
    merged = exp.merged(search.name, method, best["params"], search.expert_paths)
    result = exp.test_results(f"merge-{search.name}-{method}", merged["path"], search.pairs)
    return points, best, merged, result


def setting_cosines(exp: Experiment, search: SettingSearch) -> list:
    """The cosine similarities of the setting's task vectors (cached)."""
    return cached_json(exp.out / "search" / f"{search.name}-cosines-{exp.train_key}.json",
                       lambda: {"matrix": search.vectors().cosines()})["matrix"]


def _row(name, kind, evaluation, pairs, expert_test, params=None, train_s=None,
         merge_s=None) -> dict:
    results = [r for r in evaluation["results"] if (r["language"], r["task"]) in set(pairs)]
    utterances = {(r["language"], r["task"]): r.get("utterances") for r in results}
    results = [{k: v for k, v in r.items() if k != "utterances"} for r in results]
    row = {"name": name, "kind": kind, "results": results,
           "normalised": normalised_performance(results, expert_test)["percent"],
           "cost": {"train_s": train_s, "merge_s": merge_s, "eval_s": evaluation["eval_s"],
                    "device": evaluation.get("device", device_name())},
           "_utterances": utterances}  # for _add_intervals, which removes it
    if params is not None:
        row["params"] = params
    return row


def _expert_row(pairs, experts, expert_eval, expert_test) -> dict:
    results = [expert_test[p] for p in pairs]
    results = [{k: v for k, v in r.items() if k != "utterances"} for r in results]
    return {"name": "expert", "kind": "expert", "results": results, "normalised": 100.0,
            "cost": {"train_s": sum(experts[p]["train_s"] for p in pairs), "merge_s": None,
                     "eval_s": sum(expert_eval[p]["eval_s"] for p in pairs),
                     "device": experts[pairs[0]]["device"]},
            "_utterances": {p: expert_test[p].get("utterances") for p in pairs}}


_INTERVAL_KEYS = ("normalised_interval", "normalised_geometric", "normalised_geometric_interval",
                  "paired", "test_per_pair", "excluded_pairs", "all_pairs_excluded", "bootstrap")


def _add_intervals(models: list[dict], pairs, expert_test) -> None:
    """Add to every row of one setting its bootstrap intervals, geometric mean, paired tests
    against lors and mtl, test size per pair and excluded pairs
    (:func:`.intervals.bootstrap_normalised`, utterances resampled jointly across the rows
    and the experts); remove the rows' ``_utterances``. Rows from evaluations without
    per-utterance records (cached before they were stored) get none of these keys."""
    records = {model["name"]: model.pop("_utterances", None) or {} for model in models}
    experts = {pair: expert_test[pair].get("utterances") for pair in pairs}
    if not all(experts.values()) or not all(by_pair.get(pair) for by_pair in records.values()
                                            for pair in pairs):
        return
    intervals = bootstrap_normalised(records, experts)
    for model in models:
        model.update({key: intervals[model["name"]][key] for key in _INTERVAL_KEYS})


def _size(exp: Experiment) -> dict:
    config = exp.config
    size = {"languages": config.languages, "tasks": config.tasks, "settings": config.settings,
            "train_per_pair": min(len(p.train) for p in exp.selection.pairs),
            "dev_per_pair": min(len(p.dev) for p in exp.selection.pairs),
            "test_per_pair": min(len(c) for c in exp.test.values()),
            "mode": config.training.mode, "steps_per_expert": config.training.max_steps,
            "epochs": None if config.training.max_steps else config.training.epochs,
            "batch_size": config.training.batch_size, "search_metric": config.search.metric,
            "base": str(exp.base), "device": device_name()}
    return {k: v for k, v in size.items() if v is not None}


def _notes(exp: Experiment) -> list[str]:
    return ["Normalised performance: per pair, WER_expert / WER_model (asr) or BLEU_model / "
            "BLEU_expert (st), averaged, in percent (100 = every expert at once).",
            f"Hyper-parameters were chosen on dev by {exp.config.search.metric}, normalised by "
            "each pair's expert; test utterances were not used for any choice.",
            _non_matrix_note(exp.config.non_matrix),
            "The sentence bank is parallel: every language renders the same rows, so the ST "
            "test sets of all languages share their English references, and the MTL model sees "
            "each English target once per language.",
            "Merge cost = the dev search plus the streaming merge; its train cost is the "
            "experts' training time."]


def _non_matrix_note(policy: str) -> str:
    what = {"average": "the mean of the experts' task vectors (no lambda)",
            "task_arithmetic": "task arithmetic (lambda * sum)",
            "keep_base": "the base's own weights",
            "method": "each method's own rule (LoRS, task arithmetic, magnitude and SVD: lambda "
                      "* sum; TIES and DARE: pruned; TSV and Iso-C: the mean)"}[policy]
    return ("Groups outside the 2-D attention/FFN matrices (biases, LayerNorms, conv "
            f"front-end, token and position embeddings) are merged by {what} in every method "
            f"(non_matrix: {policy}).")


def summary(experiment: dict) -> str:
    return format_summary_table(experiment)
