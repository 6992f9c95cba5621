"""The shipped configs stay valid: users copy them, and the benchmark note cites one."""

from pathlib import Path

import pytest

from lors.experiment.config import load_experiment
from lors.merging.config import load_config, resolve
from lors.merging.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = [ROOT / "examples" / "benchmark-5lang.yaml",
               ROOT / "examples" / "benchmark-5lang-cpu.yaml",
               ROOT / "examples" / "settings-3lang-cpu.yaml",
               ROOT / "examples" / "methods-3lang-cpu.yaml",
               ROOT / "examples" / "mtl-plateau-3lang-cpu.yaml",
               ROOT / "src" / "lors" / "experiment" / "demo.yaml"]
DEMO = load_experiment(EXPERIMENTS[-1])
MERGES = [ROOT / "examples" / "lors-5-experts.yaml", ROOT / "examples" / "tiny-merge.yaml"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_configs_validate(path):
    config = load_experiment(path)
    assert config.languages and config.methods


def test_benchmark_is_the_paper_setting():
    config = load_experiment(EXPERIMENTS[0])
    assert config.languages == ["ca", "de", "es", "fr", "it"]
    assert config.tasks == ["asr", "st"]
    assert config.training.mode == "full"
    assert set(config.baselines) == {"mtl", "mtl_plateau", "sequential"}
    assert config.training.patience and config.training.eval_times
    # every method belongs in the benchmark, and LoRS with the exact SVD beside the default
    assert set(METHODS) | {"lors_exact"} == set(config.methods)
    assert set(config.settings) == {"all", "asr", "st", "multitask"}


def test_cpu_benchmark_is_the_paper_languages_with_the_target_methods():
    config = load_experiment(EXPERIMENTS[1])
    assert config.languages == ["ca", "de", "es", "fr", "it"] and config.settings == ["all"]
    assert config.data.disjoint_languages and config.training.patience
    # LoRS both ways, our variant against it, and the two classic baselines
    assert {"lors", "lors_exact", "lors_centred", "task_arithmetic", "ties"} <= set(config.methods)


@pytest.mark.parametrize("path", MERGES, ids=lambda p: p.name)
def test_merge_configs_validate(path):
    method, params, _ = resolve(load_config(path))
    assert method and params


def _same_data_and_training_as_the_demo(config):
    assert config.languages == DEMO.languages and config.tasks == DEMO.tasks
    assert config.data == DEMO.data
    assert config.training.model_dump(exclude={"patience"}) == \
        DEMO.training.model_dump(exclude={"patience"})


def test_settings_run_is_the_paper_settings_at_demo_size():
    config = load_experiment(EXPERIMENTS[2])
    _same_data_and_training_as_the_demo(config)
    assert set(config.settings) == {"asr", "st", "multitask", "all"}


def test_methods_run_has_every_method_at_demo_size():
    config = load_experiment(EXPERIMENTS[3])
    _same_data_and_training_as_the_demo(config)
    assert set(METHODS) | {"lors_exact"} == set(config.methods)
    # LoRS both ways on the same grid, so the paired test isolates the SVD
    assert config.methods["lors"] == config.methods["lors_exact"]


def test_plateau_run_compares_both_mtl_baselines():
    config = load_experiment(EXPERIMENTS[4])
    _same_data_and_training_as_the_demo(config)
    assert {"mtl", "mtl_plateau"} <= set(config.baselines) and config.training.patience
