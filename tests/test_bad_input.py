"""Every bad input gets a clear error naming the file or tensor, and nothing is written."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lors.tiny import save_tiny_base, save_tiny_expert
from lors.cli import main
from lors.errors import CheckpointError, CompatibilityError, ConfigError, OutputExistsError
from lors.merging import merge, validate_config


def run_merge(tiny, out, experts: dict, method="lors", **extra):
    cfg = validate_config({"base": str(tiny["base"]), "method": method,
                           "experts": [{"name": n, "path": str(p)} for n, p in experts.items()],
                           **extra})
    return merge(cfg, out)


def assert_nothing_written(tmp_path, out_name="out"):
    assert not (tmp_path / out_name).exists()
    assert not list(tmp_path.glob(f".{out_name}.tmp-*"))


def copy_expert(tiny, tmp_path, name="bad"):
    return shutil.copytree(tiny["experts"]["e0"], tmp_path / name)


def edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("key,value", [("d_model", 64), ("encoder_layers", 3),
                                       ("num_mel_bins", 80), ("vocab_size", 301),
                                       ("decoder_attention_heads", 4)])
def test_config_mismatch(tiny_models, tmp_path, key, value):
    bad = copy_expert(tiny_models, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompatibilityError, match=rf"expert 'bad'.*{key} = {value}"):
        run_merge(tiny_models, tmp_path / "out", {"e1": tiny_models["experts"]["e1"], "bad": bad})
    assert_nothing_written(tmp_path)


def test_missing_tensor(tiny_models, tmp_path):
    bad = copy_expert(tiny_models, tmp_path)
    edit_tensors(bad, lambda t: t.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(CompatibilityError, match=r"missing 1 tensor.*decoder.layers.1.fc2.bias"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})
    assert_nothing_written(tmp_path)


def test_extra_tensor(tiny_models, tmp_path):
    bad = copy_expert(tiny_models, tmp_path)
    edit_tensors(bad, lambda t: t.update({"model.adapter.weight": torch.zeros(3)}))
    with pytest.raises(CompatibilityError, match=r"tensor\(s\) the base lacks.*adapter"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})


def test_shape_mismatch(tiny_models, tmp_path):
    bad = copy_expert(tiny_models, tmp_path)
    name = "model.encoder.layers.0.fc1.weight"
    edit_tensors(bad, lambda t: t.update({name: torch.zeros(64, 31)}))
    with pytest.raises(CompatibilityError, match=rf"{name} has shape \[64, 31\], base has \[64, 32\]"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})


def test_expert_from_another_base(tiny_models, tmp_path):
    # Another random initialisation: same architecture and the same sinusoidal encoder position
    # table as the base, only the weights differ (figures: tests/test_compat_dtype.py).
    other_base = save_tiny_base(tmp_path / "other_base", seed=1)
    foreign = save_tiny_expert(other_base, tmp_path / "foreign", seed=3)
    with pytest.raises(CompatibilityError,
                       match=r"expert 'foreign'.*not fine-tuned from this base.*cosine"):
        run_merge(tiny_models, tmp_path / "out", {"foreign": foreign})
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_inf(tiny_models, tmp_path, bad_value):
    bad = copy_expert(tiny_models, tmp_path)
    name = "model.decoder.layers.1.self_attn.v_proj.weight"
    edit_tensors(bad, lambda t: t[name].view(-1).__setitem__(5, bad_value))
    with pytest.raises(CheckpointError, match=rf"expert 'bad'.*{name} contains NaN or Inf"):
        run_merge(tiny_models, tmp_path / "out", {"e1": tiny_models["experts"]["e1"], "bad": bad})
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(tiny_models, tmp_path):
    bad = copy_expert(tiny_models, tmp_path)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated or corrupt"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})
    assert_nothing_written(tmp_path)


def test_corrupt_safetensors_header(tiny_models, tmp_path):
    bad = copy_expert(tiny_models, tmp_path)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[10:20] = b"\xff" * 10
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*header"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})


class Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_needing_code_execution_is_refused(tiny_models, tmp_path):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(tiny_models["base"] / "config.json", bad / "config.json")
    with open(bad / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.encoder.conv1.weight": Payload()}, handle)
    with pytest.raises(CheckpointError, match=r"needs code execution.*refuses"):
        run_merge(tiny_models, tmp_path / "out", {"bad": bad})
    openai = tmp_path / "evil.pt"
    torch.save({"dims": {}, "model_state_dict": {}, "hook": Payload()}, openai)
    with pytest.raises(CheckpointError, match=r"needs code execution"):
        run_merge(tiny_models, tmp_path / "out", {"bad": openai})
    assert_nothing_written(tmp_path)


def test_existing_output_refused_without_force(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"already exists.*--force"):
        run_merge(tiny_models, tmp_path / "out", dict(tiny_models["experts"]))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_crash_mid_merge_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    from lors.merging import engine
    calls = {"n": 0}
    original = engine._merge_one

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_merge_one", failing)
    with pytest.raises(KeyboardInterrupt):
        run_merge(tiny_models, tmp_path / "out", dict(tiny_models["experts"]))
    assert_nothing_written(tmp_path)


def test_missing_paths_and_bad_config(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no such directory"):
        run_merge(tiny_models, tmp_path / "out", {"x": tmp_path / "nowhere"})
    with pytest.raises(ConfigError, match=r"unknown method 'nonsense'"):
        validate_config({"experts": [{"name": "a", "path": "p"}], "method": "nonsense"})
    with pytest.raises(ConfigError, match=r"parameters.rnk"):
        validate_config({"experts": [{"name": "a", "path": "p"}], "method": "lors",
                         "parameters": {"rnk": 3}})
    with pytest.raises(ConfigError, match=r"rank.*not used by method 'ties'"):
        run_merge(tiny_models, tmp_path / "out", dict(tiny_models["experts"]), method="ties",
                  parameters={"rank": 3})
    with pytest.raises(ConfigError, match=r"unknown group 'attention'"):
        validate_config({"experts": [{"name": "a", "path": "p"}], "method": "lors",
                         "groups": {"attention": "lors"}})
    with pytest.raises(ConfigError, match=r"2-D matrices.*conv_frontend"):
        run_merge(tiny_models, tmp_path / "out", dict(tiny_models["experts"]),
                  groups={"conv_frontend": "lors"})
    assert_nothing_written(tmp_path)


def test_cli_reports_errors_without_traceback(tiny_models, tmp_path, capsys):
    code = main(["merge", "--base", str(tiny_models["base"]), "--expert",
                 f"x={tmp_path / 'missing'}", "--method", "lors", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lors: error:") and "Traceback" not in err


def test_unreachable_hub_id_gives_clear_error():
    # A hub id is tried only when no such local path exists; offline it must fail clearly.
    import os
    import subprocess
    import sys
    code = ("from lors.checkpoint.reader import open_checkpoint\n"
            "from lors.errors import CheckpointError\n"
            "try:\n    open_checkpoint('lors-test-org/no-such-whisper')\n"
            "except CheckpointError as exc:\n    print('ERROR:', exc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120).stdout
    assert "ERROR: lors-test-org/no-such-whisper: not a local path" in out
    assert "local directory" in out
