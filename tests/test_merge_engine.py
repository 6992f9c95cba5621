"""End to end on tiny random Whisper models: merge -> directory -> loads -> generates."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from transformers import WhisperForConditionalGeneration, pipeline

from conftest import load_state, read_json, save_tiny_base
from lors.checkpoint.names import hf_to_openai
from lors.checkpoint.reader import open_checkpoint
from lors.cli import main
from lors.merging import merge, validate_config
from lors.merging.methods import METHODS


def config_for(tiny, method, **params):
    return validate_config({
        "base": str(tiny["base"]),
        "experts": [{"name": n, "path": str(p)} for n, p in tiny["experts"].items()],
        "method": method, "parameters": params})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_loadable_generating_model(tiny_models, tmp_path, method):
    report = merge(config_for(tiny_models, method), tmp_path / "out")
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out")
    tokens = model.generate(torch.randn(1, 16, 100), max_new_tokens=4)
    assert tokens.shape[0] == 1 and tokens.shape[1] >= 2
    for tensor in model.state_dict().values():
        assert torch.isfinite(tensor).all()
    assert report["resolved_config"]["method"] == method
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary left behind


def test_task_arithmetic_equals_state_dict_reference(tiny_models, tmp_path):
    merge(config_for(tiny_models, "task_arithmetic", **{"lambda": 0.4}), tmp_path / "ta")
    base = load_state(tiny_models["base"])
    experts = [load_state(p) for p in tiny_models["experts"].values()]
    merged = load_state(tmp_path / "ta")
    for name, value in base.items():
        expected = value + 0.4 * sum(e[name] - value for e in experts)
        assert torch.allclose(merged[name], expected, atol=1e-6), name


def test_lors_prunes_only_attention_and_ffn_matrices(tiny_models, tmp_path):
    report = merge(config_for(tiny_models, "lors", rank=2, keep=0.2), tmp_path / "lors")
    ops = {t["name"]: t["op"] for t in report["diagnostics"]["tensors"]}
    assert ops["model.encoder.layers.0.fc1.weight"] == "lors"
    assert ops["model.decoder.layers.1.encoder_attn.k_proj.weight"] == "lors"
    assert ops["model.encoder.layers.0.fc1.bias"] == "task_arithmetic"
    assert ops["model.encoder.conv1.weight"] == "task_arithmetic"
    assert report["groups"]["ffn"] == {"op": "lors", "tensors": 8, "parameters": 8 * 64 * 32}


def test_report_has_provenance_and_diagnostics(tiny_models, tmp_path):
    merge(config_for(tiny_models, "lors", rank=2, seed=5), tmp_path / "out")
    report = read_json(tmp_path / "out" / "merge_report.json")
    assert report["seed"] == 5 and report["resolved_config"]["parameters"]["rank"] == 2
    assert set(report["inputs"]["experts"]) == {"e0", "e1", "e2"}
    assert {"torch", "transformers", "safetensors", "lors"} <= set(report["library_versions"])
    fc1 = next(t for t in report["diagnostics"]["tensors"]
               if t["name"] == "model.decoder.layers.0.fc1.weight")
    assert len(fc1["task_vector_norms"]) == 3 and len(fc1["cosine"]) == 3
    assert all(0 < e <= 1 for e in fc1["energy_kept_low_rank"])
    assert 0.3 < fc1["sign_conflict_rate"] <= 1.0  # independent random experts disagree often
    assert "encoder.0" in report["diagnostics"]["layers"]
    assert report["diagnostics"]["model"]["cosine"][0][0] == pytest.approx(1.0)


def test_output_keeps_base_dtype_aux_files_and_shards(tiny_models, tmp_path):
    half = tmp_path / "half_base"
    WhisperForConditionalGeneration.from_pretrained(tiny_models["base"]).half().save_pretrained(half)
    for name in ("generation_config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        shutil.copy(tiny_models["base"] / name, half / name)
    experts = {n: str(p) for n, p in tiny_models["experts"].items()}
    cfg = validate_config({"base": str(half), "method": "average", "shard_size_mb": 0.05,
                           "experts": [{"name": n, "path": p} for n, p in experts.items()]})
    merge(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"
    assert open_checkpoint(tmp_path / "out").meta["model.encoder.conv1.weight"].dtype == torch.float16
    generation = read_json(tmp_path / "out" / "generation_config.json")
    assert generation["lang_to_id"]["<|de|>"] and generation["task_to_id"]["translate"]
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "out"))
    assert isinstance(asr(np.zeros(8000, dtype=np.float32), generate_kwargs={"max_new_tokens": 3})["text"], str)


def test_inputs_in_every_supported_format(tiny_models, tmp_path):
    # expert 0 as openai .pt, expert 1 as pytorch_model.bin, expert 2 sharded safetensors
    e0, e1, e2 = tiny_models["experts"].values()
    state = load_state(e0)
    config = read_json(e0 / "config.json")
    dims = {"n_mels": config["num_mel_bins"], "n_audio_ctx": config["max_source_positions"],
            "n_audio_state": config["d_model"], "n_audio_head": config["encoder_attention_heads"],
            "n_audio_layer": config["encoder_layers"], "n_vocab": config["vocab_size"],
            "n_text_ctx": config["max_target_positions"], "n_text_state": config["d_model"],
            "n_text_head": config["decoder_attention_heads"], "n_text_layer": config["decoder_layers"]}
    openai_state = {hf_to_openai(k): v for k, v in state.items() if k != "proj_out.weight"}
    torch.save({"dims": dims, "model_state_dict": openai_state}, tmp_path / "e0.pt")
    (tmp_path / "e1").mkdir()
    shutil.copy(e1 / "config.json", tmp_path / "e1" / "config.json")
    torch.save(load_state(e1), tmp_path / "e1" / "pytorch_model.bin")
    WhisperForConditionalGeneration.from_pretrained(e2).save_pretrained(tmp_path / "e2",
                                                                         max_shard_size="50KB")
    assert (tmp_path / "e2" / "model.safetensors.index.json").is_file()
    cfg = validate_config({"base": str(tiny_models["base"]), "method": "task_arithmetic",
                           "experts": [{"name": "a", "path": str(tmp_path / "e0.pt")},
                                       {"name": "b", "path": str(tmp_path / "e1")},
                                       {"name": "c", "path": str(tmp_path / "e2")}]})
    merge(cfg, tmp_path / "mixed")
    reference = tmp_path / "reference"
    merge(config_for(tiny_models, "task_arithmetic"), reference)
    ours, expected = load_state(tmp_path / "mixed"), load_state(reference)
    for name in expected:
        assert torch.allclose(ours[name], expected[name], atol=1e-6), name


def test_seeded_dare_is_reproducible_and_seed_sensitive(tiny_models, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge(config_for(tiny_models, "dare", seed=seed), tmp_path / name)
    a, b, c = (load_state(tmp_path / n) for n in "abc")
    key = "model.decoder.layers.0.fc2.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_ties_global_scope_keeps_the_global_fraction(tiny_models, tmp_path):
    report = merge(config_for(tiny_models, "ties", scope="global", keep=0.1), tmp_path / "g")
    assert len(report["global_thresholds"]) == 3
    base = load_state(tiny_models["base"])
    e0 = load_state(tiny_models["experts"]["e0"])
    magnitudes = torch.cat([(e0[n] - base[n]).abs().reshape(-1) for n in base
                            if n != "proj_out.weight" and n != "model.encoder.embed_positions.weight"
                            ] + [torch.zeros(base["model.encoder.embed_positions.weight"].numel())])
    kept = int((magnitudes >= report["global_thresholds"][0]).sum())
    assert kept == int(0.1 * magnitudes.numel())


def test_group_override_keep_base(tiny_models, tmp_path):
    cfg = config_for(tiny_models, "task_arithmetic")
    cfg = cfg.model_copy(update={"groups": {"token_embedding": "keep_base"}})
    merge(cfg, tmp_path / "out")
    merged, base = load_state(tmp_path / "out"), load_state(tiny_models["base"])
    assert torch.equal(merged["model.decoder.embed_tokens.weight"],
                       base["model.decoder.embed_tokens.weight"])
    assert not torch.equal(merged["model.decoder.layers.0.fc1.weight"],
                           base["model.decoder.layers.0.fc1.weight"])


def test_cli_flags_yaml_and_dry_run(tiny_models, tmp_path, capsys):
    experts = [f"--expert={n}={p}" for n, p in tiny_models["experts"].items()]
    assert main(["merge", "--base", str(tiny_models["base"]), *experts, "--method", "lors",
                 "--rank", "2", "--keep", "0.3", "--lambda", "0.5", "--seed", "3",
                 "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    params = read_json(tmp_path / "cli" / "merge_report.json")["resolved_config"]["parameters"]
    assert (params["rank"], params["keep"], params["lambda"], params["seed"]) == (2, 0.3, 0.5, 3)

    config = {"base": str(tiny_models["base"]), "method": "ties",
              "experts": [{"name": n, "path": str(p), "weight": 1.0}
                          for n, p in tiny_models["experts"].items()],
              "parameters": {"keep": 0.5}, "groups": {"conv_frontend": "keep_base"}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "merge.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "conv_frontend" in printed and "keep_base" in printed and "nothing written" in printed
    assert '"keep": 0.5' in printed
    assert main(["merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "yaml"),
                 "--quiet"]) == 0
    assert (tmp_path / "yaml" / "model.safetensors").is_file()
    assert not (tmp_path / "dry").exists()


def test_force_replaces_existing_output(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    merge(config_for(tiny_models, "average"), out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_tiny_base_with_other_seed_fixture_is_distinct(tmp_path):
    a = save_tiny_base(tmp_path / "a", seed=1)
    b = save_tiny_base(tmp_path / "b", seed=2)
    assert not torch.equal(load_state(a)["model.encoder.conv1.weight"],
                           load_state(b)["model.encoder.conv1.weight"])
