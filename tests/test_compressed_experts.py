"""Compressed task vectors (``lors compress``): the file is the LoRS pruning a merge would
compute, so merging it equals merging the full expert; other methods get the decompressed
delta; bad files and bases are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lors.checkpoint.compressed import FORMAT
from lors.cli import main
from lors.errors import CheckpointError, ConfigError, LorsError, LorsWarning
from lors.merging import merge, validate_config
from lors.merging import primitives as P
from lors.merging.compress import compress
from lors.merging.groups import MATRIX_GROUPS, group_of
from lors.tiny import save_tiny_base, save_tiny_expert
from test_lora_experts import make_adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compress")
    base = save_tiny_base(root / "base")
    return {"root": root, "base": base,
            "e0": save_tiny_expert(base, root / "e0", seed=1, scale=0.01),
            "e1": save_tiny_expert(base, root / "e1", seed=2, scale=0.01),
            "lora": make_adapter(base, root / "lora", seed=3)}


def config(base, experts: dict, method="lors", **parameters):
    return validate_config({"base": str(base), "method": method, "parameters": parameters,
                            "experts": [{"name": n, "path": str(p)} for n, p in experts.items()]})


def merged(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_lors_merge_of_compressed_experts_equals_that_of_the_full_experts(setup, tmp_path, svd):
    settings = {"rank": 3, "keep": 0.3, "svd": svd, "seed": 4}
    experts = {"e0": setup["e0"], "e1": setup["e1"], "lora": setup["lora"]}
    compressed = {name: tmp_path / f"{name}.safetensors" for name in experts}
    for name, path in experts.items():
        compress(str(setup["base"]), str(path), compressed[name], **settings)
    merge(config(setup["base"], experts, **settings), tmp_path / "full")
    merge(config(setup["base"], compressed, **settings), tmp_path / "compressed")
    assert_same(merged(tmp_path / "full"), merged(tmp_path / "compressed"))
    with safe_open(compressed["lora"], "pt") as handle:  # untouched tensors: listed as zero
        assert len(json.loads(handle.metadata()["zero"])) > len(handle.keys()) / 4


def test_other_methods_merge_the_decompressed_delta(setup, tmp_path):
    path = tmp_path / "e0.safetensors"
    compress(str(setup["base"]), str(setup["e0"]), path, rank=2, keep=0.25, svd="exact")
    merge(config(setup["base"], {"e0": path}, "task_arithmetic", **{"lambda": 1.0}),
          tmp_path / "out")
    base, expert, out = (load_file(Path(p) / "model.safetensors")
                         for p in (setup["base"], setup["e0"], tmp_path / "out"))
    pruned = 0
    for name, value in out.items():
        tau = expert[name] - base[name]
        if group_of(name) in MATRIX_GROUPS and tau.dim() == 2:
            tau = P.lors_prune(tau, 2, 0.25, exact=True)  # L + R_kept, not the whole tau
            pruned += 1
        torch.testing.assert_close(value - base[name], tau, rtol=0, atol=1e-5, msg=name)
    assert pruned == 4 * 6 + 2 * 4  # decoder: 2 x (8 attention + 2 FFN); encoder: 2 x (4 + 2)


def test_lors_with_other_settings_warns_and_reprunes_the_decompressed_delta(setup, tmp_path):
    path = tmp_path / "e0.safetensors"
    compress(str(setup["base"]), str(setup["e0"]), path, rank=2, keep=0.25, svd="exact")
    with pytest.warns(LorsWarning, match="is compressed with LoRS .* decompressed task vector"):
        merge(config(setup["base"], {"e0": path}, rank=4, keep=0.25, svd="exact"),
              tmp_path / "out")


def test_cli_prints_sizes_and_refuses_to_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "e0.safetensors"
    args = ["compress", "--base", str(setup["base"]), "--expert", str(setup["e0"]),
            "--rank", "2", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "MB full checkpoint" in printed and "float32" in printed
    stamp = out.stat().st_mtime_ns
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == stamp
    assert main(args + ["--force"]) == 0
    with safe_open(out, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT and json.loads(metadata["settings"])["rank"] == 2
    assert metadata["source"] == str(setup["e0"]) and metadata["base_fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.safetensors"]  # no temporaries


def _rewrite(path: Path, drop: str | None = None, **metadata) -> None:
    with safe_open(path, "pt") as handle:
        old = handle.metadata()
    tensors = {k: v for k, v in load_file(path).items() if drop is None or not k.startswith(drop)}
    save_file(tensors, path, metadata={**old, **metadata})


BAD = {
    "corrupt settings": (lambda p: _rewrite(p, settings="{rank: 2"), "'settings' is missing or corrupt"),
    "settings without keep": (lambda p: _rewrite(p, settings='{"rank": 2, "svd": "exact"}'),
                              "'settings' is missing or corrupt"),
    "corrupt zero list": (lambda p: _rewrite(p, zero="[1, 2]"), "'zero' is not a JSON list"),
    "missing tensor": (lambda p: _rewrite(p, drop="model.decoder.layers.0.fc2.weight:value"),
                       "tensor model.decoder.layers.0.fc2.weight of the base is missing"),
    "missing dense": (lambda p: _rewrite(p, drop="model.decoder.layer_norm.bias"),
                      "tensor model.decoder.layer_norm.bias of the base is missing"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated or corrupt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_compressed_files_are_refused_before_writing(setup, tmp_path, case, capsys):
    path = tmp_path / "e0.safetensors"
    compress(str(setup["base"]), str(setup["e0"]), path, rank=2, keep=0.25)
    spoil, message = BAD[case]
    spoil(path)
    with pytest.raises(CheckpointError, match=message):
        merge(config(setup["base"], {"e0": path, "e1": setup["e1"]}, rank=2, keep=0.25),
              tmp_path / "out")
    assert main(["merge", "--base", str(setup["base"]), "--expert", f"e0={path}",
                 "--method", "lors", "--out", str(tmp_path / "cli")]) == 2
    assert "lors: error: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.safetensors"]


def test_compressed_expert_on_another_base_is_refused(setup, tmp_path):
    path = tmp_path / "e0.safetensors"
    compress(str(setup["base"]), str(setup["e0"]), path, rank=2)
    other = save_tiny_base(tmp_path / "other", seed=9)
    with pytest.raises(CheckpointError, match="compressed on another base"):
        merge(config(other, {"e0": path}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_compress_requests_are_refused(setup, tmp_path):
    path = tmp_path / "e0.safetensors"
    compress(str(setup["base"]), str(setup["e0"]), path, rank=2)
    with pytest.raises(ConfigError, match="already a compressed expert"):
        compress(str(setup["base"]), str(path), tmp_path / "again.safetensors")
    with pytest.raises(ConfigError, match="one .safetensors file"):
        compress(str(setup["base"]), str(setup["e0"]), tmp_path / "e0.bin")
    with pytest.raises(ConfigError, match="keep"):
        compress(str(setup["base"]), str(setup["e0"]), tmp_path / "k.safetensors", keep=0)
    with pytest.raises(LorsError, match="already exists"):
        compress(str(setup["base"]), str(setup["e0"]), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e0.safetensors"]


def test_yaml_config_mixes_full_lora_and_compressed_experts(setup, tmp_path, capsys):
    import yaml
    packed = tmp_path / "e1.safetensors"
    assert main(["compress", "--base", str(setup["base"]), "--expert", str(setup["e1"]),
                 "--rank", "3", "--out", str(packed)]) == 0
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(setup["base"]), "method": "lors", "parameters": {"rank": 3, "keep": 0.2},
        "experts": [{"name": "full", "path": str(setup["e0"])},
                    {"name": "lora", "path": str(setup["lora"])},
                    {"name": "packed", "path": str(packed)}]}))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    kinds = {n: e["kind"] for n, e in report["inputs"]["experts"].items()}
    assert kinds == {"full": "safetensors", "lora": "lora_adapter", "packed": "lors_compressed"}
    energy = next(t["energy_kept_low_rank"] for t in report["diagnostics"]["tensors"]
                  if "energy_kept_low_rank" in t)
    assert energy[2] is None and energy[1] is not None  # the packed expert came pruned
