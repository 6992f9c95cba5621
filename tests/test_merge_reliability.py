"""Defects a new user hit with `lors merge` (issue 11), one test each; nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lors.cli import build_parser, main


def merge_args(tiny, out, *extra, experts=("e0", "e1")) -> list[str]:
    args = ["merge", "--base", str(tiny["base"]), "--method", "lors", "--rank", "2",
            "--out", str(out), "--quiet"]
    for name in experts:
        args += ["--expert", f"{name}={tiny['experts'][name]}"]
    return args + list(extra)


def test_repeated_expert_name_is_refused(tiny_models, tmp_path, capsys):
    e0, e1 = tiny_models["experts"]["e0"], tiny_models["experts"]["e1"]
    code = main(["merge", "--base", str(tiny_models["base"]), "--method", "lors",
                 "--expert", f"a={e0}", "--expert", f"a={e1}", "--out", str(tmp_path / "o")])
    assert code == 2 and "--expert a= given twice" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_same_checkpoint_under_two_names_warns(tiny_models, tmp_path, capsys):
    e0 = tiny_models["experts"]["e0"]
    code = main(["merge", "--base", str(tiny_models["base"]), "--method", "task_arithmetic",
                 "--expert", f"a={e0}", "--expert", f"b={e0}/", "--out", str(tmp_path / "o"),
                 "--quiet", "--no-diagnostics"])
    err = capsys.readouterr().err
    assert code == 0
    assert "lors: warning: experts 'a' and 'b' are the same checkpoint" in err


def test_rank_above_every_matrix_and_negative_lambda_warn(tiny_models, tmp_path, capsys):
    code = main(merge_args(tiny_models, tmp_path / "o", "--lambda", "-0.5") + ["--rank", "64"])
    err = capsys.readouterr().err
    assert code == 0
    assert "lors: warning: rank 64 >= min(m, n) for 32 of 32 pruned matrices" in err
    assert "lors: warning: lambda -0.5 is negative" in err


def test_merged_tensors_that_overflow_are_refused_before_writing(tiny_models, tmp_path, capsys):
    # finite in float32, beyond float16's 65504 once cast
    code = main(merge_args(tiny_models, tmp_path / "sub" / "o", "--lambda", "1e8",
                           "--dtype", "float16", "--no-diagnostics"))
    err = capsys.readouterr().err
    assert code == 2 and "contains NaN or Inf" in err and "Nothing was written" in err
    assert list(tmp_path.iterdir()) == []  # no output, temporary or parent folder


def test_nan_in_an_expert_leaves_no_parent_folders(tiny_models, tmp_path, capsys):
    bad = shutil.copytree(tiny_models["experts"]["e1"], tmp_path / "inputs" / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.decoder.layers.1.fc1.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "a" / "b" / "out"
    code = main(["merge", "--base", str(tiny_models["base"]), "--method", "lors",
                 "--expert", f"good={tiny_models['experts']['e0']}", "--expert", f"bad={bad}",
                 "--out", str(out), "--quiet"])
    assert code == 2 and "NaN or Inf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_shard_size_zero_is_validated(tiny_models, tmp_path, capsys):
    assert main(merge_args(tiny_models, tmp_path / "o", "--shard-size-mb", "0")) == 2
    assert "shard_size_mb" in capsys.readouterr().err


def test_output_under_a_regular_file_is_refused_before_any_weight_is_read(tiny_models, tmp_path,
                                                                           capsys, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    reads = []
    from lors.checkpoint.reader import Checkpoint
    original = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, n: reads.append(n) or original(self, n))
    assert main(merge_args(tiny_models, tmp_path / "file" / "out")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and reads == []


def test_dangling_symlink_output_is_refused(tiny_models, tmp_path, capsys):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    assert main(merge_args(tiny_models, tmp_path / "link")) == 2
    assert "dangling symbolic link" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["link"]


@pytest.mark.parametrize("which", ["base", "expert", "parent of expert"])
def test_force_onto_an_input_is_refused(tiny_models, tmp_path, capsys, which):
    base = shutil.copytree(tiny_models["base"], tmp_path / "base")
    expert = shutil.copytree(tiny_models["experts"]["e0"], tmp_path / "experts" / "e0")
    out = {"base": base, "expert": expert, "parent of expert": tmp_path / "experts"}[which]
    code = main(["merge", "--base", str(base), "--method", "lors", "--expert", f"a={expert}",
                 "--out", str(out), "--force", "--quiet"])
    assert code == 2 and "is an input of this merge" in capsys.readouterr().err
    assert (base / "model.safetensors").is_file() and (expert / "model.safetensors").is_file()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to run the check as an unprivileged user")
def test_unwritable_output_folder_is_refused_before_merging(tiny_models, tmp_path):
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", "import lors.cli"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this checkout is not readable by an unprivileged user")
    shared = Path("/tmp") / f"lors-ro-{os.getpid()}"
    shutil.rmtree(shared, ignore_errors=True)
    try:
        shutil.copytree(tiny_models["base"], shared / "base")
        shutil.copytree(tiny_models["experts"]["e0"], shared / "e0")
        (shared / "locked").mkdir()
        for path in [shared, *shared.rglob("*")]:  # readable by all, writable by root only
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        code = ("import sys; from lors.cli import main; sys.exit(main(sys.argv[1:]))")
        run = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", code, "merge", "--base", str(shared / "base"), "--method", "lors",
             "--expert", f"a={shared / 'e0'}", "--out", str(shared / "locked" / "out")],
            capture_output=True, text=True, env={**os.environ, "HOME": str(shared)},
            cwd=str(shared), timeout=300)
        assert run.returncode == 2, run.stderr
        assert "cannot write" in run.stderr and "locked" in run.stderr
        assert list((shared / "locked").iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_top_level_help_has_no_rst_markup():
    text = build_parser().format_help()
    assert "``" not in text and "Whisper" in text


def test_package_face():
    import lors
    from lors import evaluate, merge, run_experiment, train
    assert {f.__name__ for f in (merge, train, evaluate, run_experiment)} == set(lors.__all__)


def test_package_face_merges_from_a_dict(tiny_models, tmp_path):
    import lors
    report = lors.merge({"base": str(tiny_models["base"]), "method": "task_arithmetic",
                         "experts": [{"name": "a", "path": str(tiny_models["experts"]["e0"])}]},
                        tmp_path / "out", diagnostics=False)
    assert report["resolved_config"]["method"] == "task_arithmetic"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_experiment_cache_key_follows_the_base_content(tmp_path):
    """A base changed in place (same path, same shapes) gives new stage keys."""
    import yaml
    from conftest import make_tiny_speech
    from lors.data.manifest import write_manifest
    from lors.experiment.config import load_experiment
    from lors.experiment.runner import Experiment
    from lors.tiny import save_tiny_base
    base = save_tiny_base(tmp_path / "base")
    manifest = write_manifest(tmp_path / "manifest.jsonl",
                              make_tiny_speech(tmp_path, {"train": 2, "dev": 1, "test": 1}))
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "languages": ["de", "fr"],
                                    "tasks": ["asr"], "settings": ["asr"],
                                    "data": {"manifest": str(manifest)},
                                    "methods": {"task_arithmetic": {}},
                                    "out": str(tmp_path / "out")}))
    before = Experiment(load_experiment(path), show_progress=False).data_key
    tensors = load_file(base / "model.safetensors")
    tensors["model.encoder.layers.0.fc1.weight"] += 0.01
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert Experiment(load_experiment(path), show_progress=False).data_key != before


def test_methods_lists_every_method_with_its_defaults(capsys):
    from lors.merging.methods import METHODS
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in f"\n{out}" for name in METHODS)
    assert "lors            LoRS-Merging" in out and "'rank': 7" in out
