"""The new methods' wiring: configuration (calibrate, the methods' parameters, aliases) and
its bad input, the CLI's ``--calibrate``, and the experiment's search agreeing with the
streaming engine for calibrated and centred merges. The methods' formulas are checked in
test_new_methods.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import load_state
from lors.cli import main
from lors.errors import ConfigError
from lors.merging import core, merge, validate_config
from lors.merging import primitives as P
from lors.merging.config import resolve
from lors.merging.groups import MATRIX_GROUPS
from lors.merging.methods import CALIBRATIONS, METHODS, OPS
from test_experiment import assert_states_equal, search_vectors  # noqa: F401 (a fixture)


# ------------------------------------------------------------------ configuration and CLI

def raw_config(**extra) -> dict:
    return {"method": "task_arithmetic", "experts": [{"name": "a", "path": "x"},
                                                     {"name": "b", "path": "y"}], **extra}


def test_method_svc_calibrates_by_default_and_others_only_when_asked():
    _, resolved, ops = resolve(validate_config(raw_config(method="svc")))
    assert resolved["calibrate"] == "svc" and resolved["svc_alpha"] == 0.5  # 1/T
    assert resolved["lambda"] == 0.5 and ops["ffn"] == ops["bias"] == "task_arithmetic"
    _, resolved, _ = resolve(validate_config(raw_config(method="ties")))
    assert "calibrate" not in resolved and "svc_alpha" not in resolved
    _, resolved, _ = resolve(validate_config(raw_config(
        method="ties", calibrate="svc", parameters={"svc_alpha": 0.3})))
    assert (resolved["calibrate"], resolved["svc_alpha"]) == ("svc", 0.3)
    assert set(METHODS) >= {"cart", "iso_cts", "svc"} and CALIBRATIONS == ("svc",)


@pytest.mark.parametrize("extra,message", [
    ({"calibrate": "spectral"}, r"unknown calibration 'spectral'; choices: svc"),
    ({"parameters": {"svc_alpha": 0.2}}, r"svc_alpha .* calibrat"),
    ({"calibrate": "svc", "parameters": {"svc_alpha": 0.0}}, "svc_alpha"),
    ({"calibrate": "svc", "groups": {g: "keep_base" for g in MATRIX_GROUPS}},
     "nothing to calibrate"),
    ({"parameters": {"common_ratio": 0.5}}, "not used by method"),
    ({"method": "iso_cts", "parameters": {"common_ratio": 1.5}}, "common_ratio"),
    ({"method": "cart", "parameters": {"rank": 2, "rank_ratio": 0.1}}, "rank or rank_ratio"),
    ({"method": "cart", "experts": [{"name": "a", "path": "x", "weight": 1.0},
                                    {"name": "b", "path": "y", "weight": -1.0}]},
     "sum of the expert weights"),
    ({"groups": {"bias": "cart"}}, "2-D"),
])
def test_bad_input_is_a_clear_config_error(extra, message):
    bias = {"model.encoder.layers.0.fc1.bias": SimpleNamespace(dtype=torch.float32, shape=(8,))}
    with pytest.raises(ConfigError, match=message):
        _, resolved, ops = resolve(validate_config(raw_config(**extra)))
        core.plan_entries(bias, ops, resolved)  # what the engine plans before reading weights


def test_cli_calibrate_flag(tiny_models, tmp_path, capsys):
    experts = [f"--expert={n}={p}" for n, p in tiny_models["experts"].items()]
    common = ["merge", "--base", str(tiny_models["base"]), *experts, "--quiet",
              "--no-diagnostics"]
    assert main([*common, "--method", "ties", "--calibrate", "svc",
                 "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["resolved_config"]["parameters"]["calibrate"] == "svc"
    code = main([*common, "--method", "ties", "--calibrate", "svd", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lors: error:") and "choices: svc" in err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------- the engine and the search agree

def engine(tiny, out, method, parameters, calibrate=None) -> dict:
    raw = {"base": str(tiny["base"]), "method": method, "parameters": parameters,
           "experts": [{"name": n, "path": str(p)} for n, p in tiny["experts"].items()]}
    if calibrate:
        raw["calibrate"] = calibrate
    merge(validate_config(raw), out, diagnostics=False)
    return load_state(out)


def test_calibrated_search_is_computed_per_lambda(tiny_models, search_vectors, tmp_path):
    """One SearchDelta scored at several lambdas equals the engine's merge at each: the
    calibration is redone per lambda, never scaled from another lambda's result."""
    point = search_vectors.delta("svc", {"svc_alpha": 0.4})
    for lam in (0.3, 0.9):
        assert_states_equal(search_vectors.state(point, lam),
                            engine(tiny_models, tmp_path / f"svc{lam}", "svc",
                                   {"svc_alpha": 0.4, "lambda": lam}))


def test_calibrate_on_another_method_matches_the_engine(tiny_models, search_vectors, tmp_path):
    point = search_vectors.delta("ties", {"keep": 0.3}, calibrate="svc")
    assert_states_equal(search_vectors.state(point, 0.8),
                        engine(tiny_models, tmp_path / "ties", "ties",
                               {"keep": 0.3, "lambda": 0.8}, calibrate="svc"))


def test_svc_calibrates_the_matrices_only(tiny_models, search_vectors):
    lam = 0.4
    calibrated = search_vectors.state(search_vectors.delta("svc", {}), lam)
    plain = search_vectors.state(search_vectors.delta("task_arithmetic", {}), lam)
    changed = 0
    for name, taus in search_vectors.taus.items():
        entry = core.PlanEntry(name, core.group_of(name), "task_arithmetic")
        if entry.group in MATRIX_GROUPS:
            expected = P.svc_calibrate(lam * sum(taus), taus, 1.0 / len(taus))
            torch.testing.assert_close(calibrated[name] - search_vectors.base[name], expected,
                                       rtol=1e-4, atol=1e-5)
            changed += not torch.allclose(calibrated[name], plain[name])
        else:
            assert torch.equal(calibrated[name], plain[name]), name
    assert changed > 0


def test_cart_at_lambda_zero_is_the_average_merge(search_vectors):
    assert_states_equal(search_vectors.state(search_vectors.delta("cart", {}), 0.0),
                        search_vectors.state(search_vectors.delta("average", {})))
    assert all(OPS[op].matrix_only for op in ("cart", "iso_cts"))


def test_lors_exact_alias_uses_the_exact_svd_unless_told_otherwise():
    from lors.merging.config import resolve, validate_config
    experts = [{"name": "a", "path": "x"}]
    _, params, _ = resolve(validate_config({"method": "lors_exact", "experts": experts}))
    assert params["svd"] == "exact"
    _, params, _ = resolve(validate_config({"method": "lors_exact", "experts": experts,
                                            "parameters": {"svd": "randomized"}}))
    assert params["svd"] == "randomized"
