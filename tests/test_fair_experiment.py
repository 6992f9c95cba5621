"""The experiment compares methods fairly: one non-matrix policy, equal search budgets,
lambda grids widened past an edge, edge choices flagged (issue 10, item 0)."""

from __future__ import annotations

import pytest
import torch

from lors.errors import ConfigError
from lors.experiment.config import load_experiment
from lors.experiment.report_sections import best_sweep_line, on_grid_edge
from lors.experiment.search import lambda_past_edge
from lors.merging.groups import GROUPS, MATRIX_GROUPS

BASE = {"languages": ["de", "fr"], "tasks": ["asr"], "settings": ["asr"], "out": "unused"}


def point(score: float, **params) -> dict:
    return {"params": params, "dev_score": score}


def test_unequal_grids_are_refused_with_their_sizes():
    with pytest.raises(ConfigError, match=r"equal_budget.*lors 4, ties 2"):
        load_experiment(None, **BASE, methods={"lors": {"rank": [2, 4], "lambda": [0.2, 0.4]},
                                               "ties": {"lambda": [0.5, 1.0]}, "average": {}})
    config = load_experiment(None, **BASE, methods={"lors": {"rank": [2, 4]},
                                                    "ties": {"lambda": [0.5, 1.0]},
                                                    "average": {}})  # average tunes nothing
    assert config.search.equal_budget
    load_experiment(None, **BASE, search={"equal_budget": False},
                    methods={"lors": {"rank": [2, 4], "lambda": [0.2, 0.4]}, "ties": {}})


def test_non_matrix_policy_overrides_every_non_matrix_group():
    config = load_experiment(None, **BASE, methods={"ties": {}})
    assert config.non_matrix == "average"
    assert config.group_ops() == {g: "average" for g in GROUPS if g not in MATRIX_GROUPS}
    own = load_experiment(None, **BASE, non_matrix="method", methods={"ties": {}})
    assert own.group_ops() == {}


def test_lambda_is_widened_past_the_edge_it_won_on():
    top = [point(1, **{"lambda": 0.1}), point(2, **{"lambda": 0.2}),
           point(3, **{"lambda": 0.3})]
    assert lambda_past_edge(top) == pytest.approx(0.4)
    bottom = [point(3, **{"lambda": 0.1}), point(2, **{"lambda": 0.3})]
    assert lambda_past_edge(bottom) == pytest.approx(0.05)  # 0.1 - 0.2 < 0: half of 0.1
    inside = [point(1, **{"lambda": 0.1}), point(3, **{"lambda": 0.2}),
              point(2, **{"lambda": 0.3})]
    assert lambda_past_edge(inside) is None
    assert lambda_past_edge([point(1, rank=2), point(2, rank=4)]) is None


def test_a_choice_on_a_grid_edge_is_flagged():
    points = [point(1, rank=2, **{"lambda": 0.1}), point(2, rank=4, **{"lambda": 0.2}),
              point(3, rank=8, **{"lambda": 0.3}), {**point(2.5, rank=8, **{"lambda": 0.4}),
                                                    "widened": True}]
    assert on_grid_edge(points[2]["params"], points) == ["rank=8"]
    line = best_sweep_line("lors", points)
    assert "3 dev points (+1 past a lambda edge)" in line
    assert "On the edge of its grid: rank=8" in line


def test_search_with_a_group_policy_equals_the_engine(tiny_models, tmp_path):
    from conftest import load_state
    from lors.experiment.taskvectors import TaskVectors
    from lors.merging import merge, validate_config
    groups = {g: "average" for g in GROUPS if g not in MATRIX_GROUPS}
    experts = {n: str(p) for n, p in tiny_models["experts"].items()}
    vectors = TaskVectors(str(tiny_models["base"]), experts)
    for method in ("lors", "ties"):
        state = vectors.state(vectors.delta(method, {}, groups), 0.6)
        config = validate_config({"base": str(tiny_models["base"]), "method": method,
                                  "parameters": {"lambda": 0.6}, "groups": groups,
                                  "experts": [{"name": n, "path": p} for n, p in experts.items()]})
        merge(config, tmp_path / method, diagnostics=False)
        reference = load_state(tmp_path / method)
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)
        bias = "model.encoder.layers.0.fc1.bias"
        mean = sum(vectors.taus[bias]) / 3
        torch.testing.assert_close(state[bias], vectors.base[bias] + mean)  # lambda-free


def bank_utterances(rows: int, languages=("de", "fr", "es")) -> list:
    from lors.data.manifest import Utterance
    return [Utterance(id=f"{lang}-{split}-s{i}", language=lang, split=split, audio="x.wav",
                      duration=1.0, transcript=f"{lang} sentence {i}",
                      translation=f"sentence {i}")
            for i in range(rows) for lang in languages for split in ("train", "dev")]


def test_disjoint_languages_train_each_sentence_in_one_language_only():
    from collections import Counter
    from lors.training.data import disjoint_training
    utterances = bank_utterances(10)
    kept = disjoint_training(utterances, ["de", "fr", "es"], "bank")
    train = [u for u in kept if u.split == "train"]
    assert len({u.translation for u in train}) == len(train) == 10  # every sentence once
    assert sorted(Counter(u.language for u in train).values()) == [3, 3, 4]
    assert [u for u in kept if u.split == "dev"] == [u for u in utterances if u.split == "dev"]
    assert disjoint_training(utterances, ["de", "fr", "es"], "bank") == kept  # deterministic


def test_disjoint_languages_with_too_few_sentences_fail_before_training():
    from lors.errors import LorsError
    from lors.training.data import disjoint_training
    with pytest.raises(LorsError, match=r"disjoint_languages: bank has 10 distinct train "
                                        r"sentences for 3 languages.*train_per_pair = 5"):
        disjoint_training(bank_utterances(10), ["de", "fr", "es"], "bank", needed=5)


def test_lambda_per_group_and_block_in_the_engine(tiny_models, tmp_path):
    """The most specific selector wins: group.half, group, side.half, side, then lambda."""
    from conftest import load_state
    from lors.merging import merge, validate_config
    lambdas = {"encoder.lower": 0.1, "decoder": 0.2, "cross_attention.upper": 0.7,
               "layer_norm": 0.0}
    config = validate_config({"base": str(tiny_models["base"]), "method": "task_arithmetic",
                              "parameters": {"lambda": 0.5, "lambdas": lambdas},
                              "experts": [{"name": n, "path": str(p)}
                                          for n, p in tiny_models["experts"].items()]})
    merge(config, tmp_path / "out", diagnostics=False)
    merged, base = load_state(tmp_path / "out"), load_state(tiny_models["base"])
    experts = [load_state(p) for p in tiny_models["experts"].values()]
    expected = {"model.encoder.layers.0.fc1.weight": 0.1,             # encoder.lower
                "model.encoder.layers.1.fc1.weight": 0.5,             # encoder.upper: lambda
                "model.decoder.layers.0.encoder_attn.q_proj.weight": 0.2,   # decoder
                "model.decoder.layers.1.encoder_attn.q_proj.weight": 0.7,   # group.half
                "model.decoder.layers.1.self_attn_layer_norm.weight": 0.0,  # group over side
                "model.encoder.conv1.weight": 0.5}                    # outside the layers
    for name, lam in expected.items():
        want = base[name] + lam * sum(e[name] - base[name] for e in experts)
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_lambda_selector_is_refused():
    from lors.merging import validate_config
    with pytest.raises(ConfigError, match=r"lambdas: unknown group or block \['attention'\]"):
        validate_config({"method": "lors", "experts": [{"name": "a", "path": "x"}],
                         "parameters": {"lambdas": {"attention": 0.2}}})
    with pytest.raises(ConfigError, match="not used"):  # the mean reads no lambda
        from lors.merging.config import resolve
        resolve(validate_config({"method": "average", "experts": [{"name": "a", "path": "x"}],
                                 "parameters": {"lambdas": {"encoder": 0.2}}}))


def test_search_with_block_lambdas_equals_the_engine(tiny_models, tmp_path):
    from conftest import load_state
    from lors.experiment.taskvectors import TaskVectors
    from lors.merging import merge, validate_config
    experts = {n: str(p) for n, p in tiny_models["experts"].items()}
    vectors = TaskVectors(str(tiny_models["base"]), experts)
    lambdas = {"encoder.upper": 0.9, "cross_attention.lower": 0.05, "decoder": 0.3}
    state = vectors.state(vectors.delta("lors", {"rank": 2}), 0.4, lambdas)
    config = validate_config({"base": str(tiny_models["base"]), "method": "lors",
                              "parameters": {"rank": 2, "lambda": 0.4, "lambdas": lambdas},
                              "experts": [{"name": n, "path": p} for n, p in experts.items()]})
    merge(config, tmp_path / "m", diagnostics=False)
    reference = load_state(tmp_path / "m")
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_block_lambda_search_end_to_end_on_a_tiny_experiment(tmp_path):
    """Random per-block lambda points are scored after the grid, the same count per method,
    and a chosen point with lambdas is merged by the engine."""
    import yaml
    from conftest import make_tiny_speech
    from lors.data.manifest import write_manifest
    from lors.experiment.runner import run_experiment
    from lors.tiny import save_tiny_base
    base = save_tiny_base(tmp_path / "base", chunk_seconds=10)
    manifest = write_manifest(tmp_path / "manifest.jsonl",
                              make_tiny_speech(tmp_path, {"train": 4, "dev": 2, "test": 2}))
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(base), "languages": ["de", "fr"], "tasks": ["asr"], "settings": ["asr"],
        "baselines": [], "data": {"manifest": str(manifest)},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 3e-3},
        "evaluation": {"max_new_tokens": 4},
        "search": {"block_lambdas": 3, "widen_edges": 0},
        "methods": {"lors": {"rank": 2, "lambda": [0.5, 1.0]},
                    "task_arithmetic": {"lambda": [0.5, 1.0]}, "average": {}},
        "out": str(tmp_path / "out")}))
    experiment = run_experiment(load_experiment(path), show_progress=False)
    for method in ("lors", "task_arithmetic"):
        points = [p for p in experiment["sweeps"] if p["method"] == method]
        blocks = [p for p in points if p.get("blocks")]
        assert len(points) == 5 and len(blocks) == 3
        assert all(set(p["params"]["lambdas"]) == {"encoder.lower", "encoder.upper",
                                                   "decoder.lower", "decoder.upper",
                                                   "cross_attention.lower",
                                                   "cross_attention.upper"} for p in blocks)
    assert not [p for p in experiment["sweeps"] if p["method"] == "average" and p.get("blocks")]
    rows = {m["name"]: m for m in experiment["settings"][0]["models"]}
    assert rows["lors"]["normalised"] is not None
