"""Property-based tests of `lors merge` on tiny random Whisper models (hypothesis).

Random valid configs merge into a model with finite weights; random invalid configs and
arguments fail with one `lors: error:` line and leave nothing behind (no output, no
temporary, no parent folder created).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from lors.cli import main
from lors.merging.config import lambda_selectors
from lors.merging.groups import GROUPS, MATRIX_GROUPS
from lors.merging.methods import METHOD_ALIASES, METHODS, OPS

PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
TWO_D_GROUPS = sorted(MATRIX_GROUPS | {"token_embedding", "position_embedding"})
PARAMETER_VALUES = {
    "lambda": st.floats(-0.5, 2.0, allow_nan=False),
    "rank": st.integers(1, 40),
    "rank_ratio": st.floats(0.01, 1.0),
    "keep": st.floats(0.01, 1.0),
    "scope": st.sampled_from(["tensor", "global"]),
    "dare_combine": st.sampled_from(["linear", "ties"]),
    "seed": st.integers(0, 2**31 - 1),
    "svd": st.sampled_from(["randomized", "exact"]),
    "common_ratio": st.floats(0.0, 1.0),
    "lambdas": st.dictionaries(st.sampled_from(lambda_selectors()),
                               st.floats(-0.5, 2.0, allow_nan=False), max_size=3),
}


@st.composite
def valid_configs(draw, experts: dict[str, Path], base: Path) -> dict:
    method = draw(st.sampled_from(sorted(METHODS) + sorted(METHOD_ALIASES)))
    spec = METHODS[METHOD_ALIASES.get(method, (method,))[0]]
    groups = {}
    for group in draw(st.lists(st.sampled_from(GROUPS), max_size=3, unique=True)):
        allowed = sorted(o for o in OPS if not OPS[o].matrix_only or group in TWO_D_GROUPS)
        groups[group] = draw(st.sampled_from(allowed))
    ops = {groups.get(g, spec.op_for_group(g)) for g in GROUPS}
    readable = sorted((set().union(*(OPS[o].parameters for o in ops)) | {"seed", "svd"})
                      & set(PARAMETER_VALUES))
    chosen = draw(st.lists(st.sampled_from(readable), max_size=4, unique=True))
    if "rank" in chosen and "rank_ratio" in chosen:
        chosen.remove("rank_ratio")
    params = {key: draw(PARAMETER_VALUES[key]) for key in chosen}
    if "lambda" in readable and draw(st.booleans()):
        params["lambdas"] = draw(PARAMETER_VALUES["lambdas"])
    calibrate = None
    matrix_ops = {groups.get(g, spec.op_for_group(g)) for g in MATRIX_GROUPS}
    if matrix_ops != {"keep_base"} and draw(st.booleans()):
        calibrate = "svc"
        if draw(st.booleans()):
            params["svc_alpha"] = draw(st.floats(0.05, 2.0))
    names = draw(st.lists(st.sampled_from(sorted(experts)), min_size=1, unique=True))
    weights = [draw(st.floats(0.1, 2.0)) for _ in names]
    return {"base": str(base), "method": method, "parameters": params, "groups": groups,
            **({"calibrate": calibrate} if calibrate else {}),
            "experts": [{"name": n, "path": str(experts[n]), "weight": w}
                        for n, w in zip(names, weights)]}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@PROPERTY
@given(data=st.data())
def test_random_valid_configs_merge_to_finite_models(tiny_models, capsys, data):
    config = data.draw(valid_configs(tiny_models["experts"], tiny_models["base"]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "merge.yaml"
        path.write_text(yaml.safe_dump(config))
        out = Path(folder) / "out"
        code, err = run_cli(["merge", str(path), "--out", str(out), "--quiet",
                             "--no-diagnostics"], capsys)
        assert code == 0, (config, err)
        merged = load_file(out / "model.safetensors")
        assert all(math.isfinite(float(t.float().sum())) for t in merged.values())
        assert sorted(p.name for p in Path(folder).iterdir()) == ["merge.yaml", "out"]


def _defects(base: Path, experts: dict[str, Path]) -> dict:
    """Name -> (how it breaks a valid config, expected message fragment)."""
    e0, e1 = str(experts["e0"]), str(experts["e1"])
    return {
        "unknown method": (lambda c: c.update(method="lorz"), "unknown method"),
        "unknown group": (lambda c: c.update(groups={"attention": "lors"}), "unknown group"),
        "unknown op": (lambda c: c.update(groups={"ffn": "trim"}), "unknown op"),
        "nan lambda": (lambda c: c["parameters"].update({"lambda": float("nan")}), "lambda"),
        "inf lambda": (lambda c: c["parameters"].update({"lambda": float("inf")}), "lambda"),
        "nan weight": (lambda c: c["experts"][0].update(weight=float("nan")), "weight"),
        "keep 0": (lambda c: c["parameters"].update(keep=0.0), "keep"),
        "keep above 1": (lambda c: c["parameters"].update(keep=1.5), "keep"),
        "rank 0": (lambda c: c["parameters"].update(rank=0), "rank"),
        "rank and ratio": (lambda c: c["parameters"].update(rank=2, rank_ratio=0.1),
                           "rank or rank_ratio"),
        "unused parameter": (lambda c: c["parameters"].update(dare_combine="ties"),
                             "not used by method"),
        "repeated expert": (lambda c: c["experts"].append({"name": "a", "path": e1}),
                            "unique"),
        "missing expert": (lambda c: c["experts"].append({"name": "z", "path": "/no/such"}),
                           "no such directory"),
        "zero weights": (lambda c: c.update(method="average", parameters={}, experts=[
            {"name": "a", "path": e0, "weight": 1.0}, {"name": "b", "path": e1, "weight": -1.0}]),
            "sum of the expert weights"),
        "matrix op on layer norm": (lambda c: c.update(groups={"layer_norm": "lors"}), "2-D"),
        "shard size 0": (lambda c: c.update(shard_size_mb=0), "shard_size_mb"),
        "unknown dtype": (lambda c: c.update(dtype="float8"), "dtype"),
        "unknown key": (lambda c: c.update(lamda=0.3), "lamda"),
    }


DEFECT_NAMES = sorted(_defects(Path("."), {"e0": Path("."), "e1": Path(".")}))


@PROPERTY
@given(defect=st.sampled_from(DEFECT_NAMES), depth=st.integers(0, 2))
def test_random_invalid_configs_fail_cleanly_and_write_nothing(tiny_models, capsys, defect,
                                                              depth):
    config = {"base": str(tiny_models["base"]), "method": "lors",
              "parameters": {"rank": 2, "keep": 0.3},
              "experts": [{"name": "a", "path": str(tiny_models["experts"]["e0"])}]}
    breaks, message = _defects(tiny_models["base"], tiny_models["experts"])[defect]
    breaks(config)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "merge.yaml"
        path.write_text(yaml.safe_dump(config))
        out = Path(folder).joinpath(*["sub"] * depth, "out")
        code, err = run_cli(["merge", str(path), "--out", str(out), "--quiet"], capsys)
        assert code == 2, (defect, err)
        lines = [line for line in err.splitlines() if line.startswith("lors: error:")]
        assert len(lines) == 1 and message in lines[0], (defect, err)
        assert "Traceback" not in err
        assert [p.name for p in Path(folder).iterdir()] == ["merge.yaml"]


BAD_ARGUMENTS = {
    "weight not a number": (["--weight", "a=abc"], "must be a number"),
    "weight of unknown expert": (["--weight", "zz=0.5"], "unknown expert"),
    "repeated expert flag": (["--expert", "a=E1"], "given twice"),
    "nan lambda flag": (["--lambda", "nan"], "lambda"),
    "inf weight flag": (["--weight", "a=inf"], "weight"),
    "shard size 0 flag": (["--shard-size-mb", "0"], "shard_size_mb"),
    "keep 0 flag": (["--keep", "0"], "keep"),
    "expert without path": (["--expert", "b="], "NAME=VALUE"),
}


@PROPERTY
@given(bad=st.sampled_from(sorted(BAD_ARGUMENTS)))
def test_random_invalid_arguments_fail_cleanly_and_write_nothing(tiny_models, capsys, bad):
    extra, message = BAD_ARGUMENTS[bad]
    e1 = str(tiny_models["experts"]["e1"])
    extra = [e1 if part == "E1" else part.replace("E1", e1) for part in extra]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "new" / "out"
        code, err = run_cli(["merge", "--base", str(tiny_models["base"]), "--method", "lors",
                             "--expert", f"a={tiny_models['experts']['e0']}", *extra,
                             "--out", str(out), "--quiet"], capsys)
        assert code == 2 and "Traceback" not in err, (bad, err)
        assert err.startswith("lors: error:") and message in err, (bad, err)
        assert list(Path(folder).iterdir()) == []


@pytest.mark.parametrize("extra", [["--lambda", "nan"], ["--lambda", "inf"],
                                   ["--weight", "a=nan"]])
def test_non_finite_parameters_are_refused(tiny_models, tmp_path, capsys, extra):
    code, err = run_cli(["merge", "--base", str(tiny_models["base"]), "--method", "lors",
                         "--expert", f"a={tiny_models['experts']['e0']}",
                         "--expert", f"b={tiny_models['experts']['e1']}", *extra,
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "finite" in err
    assert list(tmp_path.iterdir()) == []
