"""The experiment runner end to end on a tiny random Whisper, and its input checks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_speech
from lors.data.manifest import write_manifest
from lors.errors import ConfigError, LorsError
from lors.experiment.config import load_experiment
from lors.experiment.runner import run_experiment, summary
from lors.merging.methods import METHODS
from lors.tiny import save_tiny_base


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    manifest = write_manifest(root / "manifest.jsonl",
                              make_tiny_speech(root, {"train": 6, "dev": 3, "test": 3}))
    raw = {"name": "tiny", "base": str(base), "languages": ["de", "fr"], "tasks": ["asr", "st"],
           "settings": ["all", "asr", "multitask"], "data": {"manifest": str(manifest)},
           "training": {"mode": "full", "max_steps": 3, "batch_size": 4, "learning_rate": 3e-3},
           "evaluation": {"max_new_tokens": 8},
           "methods": {"lors": {"rank": [1, 2], "keep": [0.2], "lambda": [0.5, 1.0]},
                       "task_arithmetic": {"lambda": [0.5]}, "ties": {"keep": [0.2]},
                       "dare": {"keep": 0.5, "seed": 1}, "magnitude": {}, "svd": {"rank": 2},
                       "tsv": {}, "iso_c": {}, "average": {}, "cart": {}, "iso_cts": {},
                       "svc": {}, "lors_centred": {}},
           "search": {"equal_budget": False, "widen_edges": 0},
           "extensibility": {"language": "fr"}, "out": str(root / "out")}
    path = root / "experiment.yaml"
    import yaml
    path.write_text(yaml.safe_dump(raw))
    return root, path


def test_tiny_experiment_reports_every_method_and_resumes(tiny_experiment):
    root, path = tiny_experiment
    experiment = run_experiment(load_experiment(path), show_progress=False)
    names = {m["name"] for s in experiment["settings"] for m in s["models"]}
    assert names == {"base", "expert", "mtl", "sequential"} | set(METHODS)
    html = (root / "out" / "report" / "report.html").read_text()
    markdown = (root / "out" / "report" / "report.md").read_text()
    for name in names:
        assert name in html and name in markdown
    assert "data:image/png;base64," in html
    assert [s["name"] for s in experiment["settings"]] == ["all", "asr", "multitask-de",
                                                          "multitask-fr"]
    everything = experiment["settings"][0]
    assert everything["name"] == "all" and len(everything["pairs"]) == 4
    for model in everything["models"]:
        assert model["normalised"] is not None and len(model["results"]) == 4
        assert [r["n"] for r in model["results"]] == [3] * 4  # each test clip decoded once
    lors_points = [p for p in experiment["sweeps"] if p["method"] == "lors" and p["setting"] == "all"]
    assert len(lors_points) == 4
    extension = experiment["extensibility"]
    assert [r["name"].split(" ")[0] for r in extension["rows"]] == ["existing", "add",
                                                                    "re-merge", "retrain"]
    assert all(r["normalised"] is not None and r["cost_s"] > 0 for r in extension["rows"])
    for row in extension["rows"]:  # every row with its interval, as every other table
        low, high = row["normalised_interval"]
        assert low <= row["normalised"] <= high, row
    # the existing merge had its own search, which never saw French
    assert list((root / "out" / "search").glob("all-without-fr-lors-*.json"))
    assert extension["added_params"]["lambda"] != extension["params"].get("lambda")
    assert "re-merged" in experiment["extensibility"]["note"]
    assert "lors" in summary(experiment)

    # a second run is served from the cache: no stage re-runs (files keep their mtimes)
    stamps = {p: p.stat().st_mtime_ns for p in (root / "out").rglob("*.json")
              if "report" not in p.parts and p.name != "experiment.json"}
    again = run_experiment(load_experiment(path), show_progress=False)
    assert again["settings"] == experiment["settings"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a new merge hyper-parameter re-runs the search only: the experts are not retrained
    experts_before = {p.name for p in (root / "out" / "models").iterdir()}
    searched_before = set((root / "out" / "search").iterdir())
    changed = root / "changed.yaml"
    raw = load_experiment(path).model_dump()
    raw["methods"]["task_arithmetic"] = {"lambda": [0.5, 0.8]}
    import yaml
    changed.write_text(yaml.safe_dump(raw))
    run_experiment(load_experiment(changed), show_progress=False)
    new = {p.name for p in (root / "out" / "models").iterdir()} - experts_before
    assert all(n.startswith("merge-") for n in new), new  # the chosen lambda may not change
    searched = set((root / "out" / "search").iterdir()) - searched_before
    assert len(searched) == len(experiment["settings"]) == 4  # lambda 0.8 once per setting
    assert all("task_arithmetic" in p.name for p in searched)


def test_bad_experiment_configs_fail_before_any_work(tiny_experiment, tmp_path):
    root, path = tiny_experiment
    import yaml
    raw = yaml.safe_load(path.read_text())
    for methods, message in (({"lorz": {}}, "unknown method|lorz"),
                             ({"lors": {"density": [0.2]}}, "density"),
                             ({"task_arithmetic": {"rank": [2]}}, "not used by method")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**raw, "methods": methods, "out": str(tmp_path / "o")}))
        with pytest.raises(ConfigError, match=message):
            load_experiment(bad)
    bad.write_text(yaml.safe_dump({**raw, "languages": ["fr", "sv"], "out": str(tmp_path / "o")}))
    with pytest.raises(LorsError, match=r"no language token <\|sv\|>"):
        run_experiment(load_experiment(bad), show_progress=False)
    no_refs = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    for record in no_refs:
        if record["split"] == "test":
            record["translation"] = None
    manifest = tmp_path / "manifest.jsonl"
    for record in no_refs:
        record["audio"] = str((root / record["audio"]).resolve()) if not record["audio"].startswith("/") else record["audio"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in no_refs))
    bad.write_text(yaml.safe_dump({**raw, "data": {"manifest": str(manifest)}, "out": str(tmp_path / "o")}))
    with pytest.raises(LorsError, match="has no translation"):
        run_experiment(load_experiment(bad), show_progress=False)
    assert not (tmp_path / "o").exists()


def engine_state(tiny, tmp_path, method, params) -> dict:
    from conftest import load_state
    from lors.merging import merge, validate_config
    config = validate_config({"base": str(tiny["base"]), "method": method, "parameters": params,
                              "experts": [{"name": n, "path": str(p)}
                                          for n, p in tiny["experts"].items()]})
    merge(config, tmp_path / "merged", diagnostics=False, progress=False)
    return load_state(tmp_path / "merged")


def assert_states_equal(state, reference) -> None:
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def search_vectors(tiny_models):
    from lors.experiment.taskvectors import TaskVectors
    return TaskVectors(str(tiny_models["base"]),
                       {n: str(p) for n, p in tiny_models["experts"].items()})


@pytest.mark.parametrize("method,params", [
    ("lors", {"rank": 2, "keep": 0.3}), ("task_arithmetic", {}), ("ties", {"keep": 0.3}),
    ("dare", {"keep": 0.6, "seed": 3}), ("magnitude", {"keep": 0.3}), ("svd", {"rank": 2}),
    ("tsv", {}), ("iso_c", {}), ("average", {}), ("dare_ties", {"keep": 0.6}),
    ("ties", {"keep": 0.3, "scope": "global"}), ("magnitude", {"keep": 0.3, "scope": "global"}),
    ("lors", {"rank": 3, "keep": 0.2, "svd": "exact"}), ("lors_centred", {"rank": 2, "keep": 0.3}),
    ("lors_exact", {"rank": 2}),
    ("cart", {}), ("cart", {"rank": 2, "svd": "exact"}), ("cart", {"rank_ratio": 0.2}),
    ("iso_cts", {}), ("iso_cts", {"common_ratio": 0.5}), ("svc", {}),
    ("svc", {"svc_alpha": 0.5})])
def test_search_merges_equal_the_streaming_engine(tiny_models, search_vectors, tmp_path, method,
                                                  params):
    """The in-memory search merge (lambda applied afterwards) is the engine's merge."""
    lam = 0.7
    state = search_vectors.state(search_vectors.delta(method, params), lam)
    given = params if method == "average" else {**params, "lambda": lam}
    assert_states_equal(state, engine_state(tiny_models, tmp_path, method, given))


@pytest.mark.parametrize("method", ["lors", "ties", "dare_ties", "iso_c"])
def test_a_point_without_lambda_is_scored_at_the_engine_default(tiny_models, search_vectors,
                                                               tmp_path, method):
    state = search_vectors.state(search_vectors.delta(method, {}))
    assert_states_equal(state, engine_state(tiny_models, tmp_path, method, {}))


def test_a_rank_sweep_scores_what_the_engine_writes_at_each_rank(tiny_models, search_vectors,
                                                                  tmp_path, monkeypatch):
    """Largest rank first, then smaller ones: each point equals the engine's merge at its own
    rank (a randomized sketch is never reused across ranks), and each (rank, matrix, expert)
    is decomposed once whatever the number of keeps."""
    from lors.merging import primitives
    from lors.merging.groups import MATRIX_GROUPS, group_of
    calls = []
    original = primitives.truncated_svd
    monkeypatch.setattr(primitives, "truncated_svd",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    search_vectors.svd_cache.clear()
    for rank in (4, 2):
        for keep in (0.1, 0.3):
            delta = search_vectors.delta("lors", {"rank": rank, "keep": keep})
    matrices = sum(1 for name in search_vectors.taus if group_of(name) in MATRIX_GROUPS)
    assert len(calls) == 2 * matrices * len(search_vectors.names)
    monkeypatch.undo()
    assert_states_equal(search_vectors.state(delta, 0.5),
                        engine_state(tiny_models, tmp_path, "lors",
                                     {"rank": 2, "keep": 0.3, "lambda": 0.5}))


def test_an_exact_rank_sweep_decomposes_each_matrix_once(search_vectors, monkeypatch):
    from lors.merging import primitives
    from lors.merging.groups import MATRIX_GROUPS, group_of
    calls = []
    original = primitives.truncated_svd
    monkeypatch.setattr(primitives, "truncated_svd",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    search_vectors.svd_cache.clear()
    for rank in (4, 2, 1):
        search_vectors.delta("lors", {"rank": rank, "keep": 0.2, "svd": "exact"})
    matrices = sum(1 for name in search_vectors.taus if group_of(name) in MATRIX_GROUPS)
    assert len(calls) == matrices * len(search_vectors.names)


def test_cache_keys_change_with_the_lors_version(monkeypatch):
    from lors.experiment import config as experiment_config
    key = experiment_config.digest({"lr": 1e-5}, "de-asr")
    assert experiment_config.digest({"lr": 1e-5}, "de-asr") == key  # stable within a release
    monkeypatch.setattr(experiment_config, "__version__", "999.0")
    assert experiment_config.digest({"lr": 1e-5}, "de-asr") != key
