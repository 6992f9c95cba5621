"""Training mechanics on a tiny random Whisper: loss, resume, windows, modes, bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_state, make_tiny_speech
from lors.data.manifest import Utterance, write_manifest
from lors.errors import LorsError, OutputExistsError
from lors.tiny import save_tiny_base
from lors.training import TrainConfig, train
from lors.training.batching import collate, tokenize_pairs
from lors.training.data import select
from lors.training.schedule import example_stream

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> dict:
    """A tiny base with a 10 s window and de/fr clips (0.4-0.9 s of noise plus a tone)."""
    root = tmp_path_factory.mktemp("train")
    base = save_tiny_base(root / "base", chunk_seconds=10)
    utterances = make_tiny_speech(root, {"train": 8, "dev": 4})
    manifest = write_manifest(root / "manifest.jsonl", utterances)
    return {"root": root, "base": base, "manifest": manifest, "utterances": utterances}


def config(setup, out: Path, **overrides) -> TrainConfig:
    values = dict(base=str(setup["base"]), manifest=str(setup["manifest"]), pairs=[("de", "asr")],
                  out=str(out), max_steps=6, batch_size=4, learning_rate=3e-3, eval_every=2,
                  cache_dir=str(setup["root"] / "cache"), show_progress=False, cpu=True)
    values.update(overrides)
    return TrainConfig(**values)


def fixed_batch_loss(model_dir: Path, setup) -> float:
    """Teacher-forced loss of a Whisper folder on the first four de train clips."""
    from lors.training.inputs import log_mel
    from lors.training.modes import load_whisper
    model, processor = load_whisper(model_dir)
    selection = select(setup["utterances"], [("de", "asr")], "test")
    examples = tokenize_pairs(processor.tokenizer, selection.pairs, 40)[0]
    utts = selection.pairs[0].train[:4]
    feats = log_mel(processor.feature_extractor, utts, model.config.max_source_positions)
    batch = collate([feats[u.id] for u in utts], examples.train[:4], 256)
    with torch.no_grad():
        return float(model(input_features=batch["inputs"], decoder_input_ids=batch["decoder_input_ids"],
                           labels=batch["labels"]).loss)


def test_loss_on_a_fixed_batch_drops(tiny_setup, tmp_path):
    no_dev = [u for u in tiny_setup["utterances"] if u.split == "train"]
    summary = train(config(tiny_setup, tmp_path / "expert", max_steps=12, learning_rate=1e-2), utterances=no_dev)
    before = fixed_batch_loss(tiny_setup["base"], tiny_setup)
    after = fixed_batch_loss(tmp_path / "expert", tiny_setup)
    assert after < 0.8 * before, (before, after)
    assert summary["samples"] == 48 and summary["best_step"] == 12  # no dev: the last step
    log = [json.loads(line) for line in (tmp_path / "expert" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))


def test_best_checkpoint_is_chosen_on_dev(tiny_setup, tmp_path):
    summary = train(config(tiny_setup, tmp_path / "expert", max_steps=4))
    log = [json.loads(line) for line in (tmp_path / "expert" / "train_log.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["dev_token_accuracy"] for r in log if "dev_token_accuracy" in r}
    assert sorted(scores) == [2, 4]
    assert summary["best_step"] == max(scores, key=lambda s: (scores[s], -s))


def test_short_window_training_saves_a_standard_checkpoint(tiny_setup, tmp_path):
    summary = train(config(tiny_setup, tmp_path / "expert", max_steps=2))
    assert summary["encoder_positions"] == 400  # 8 s minimum window < the 10 s (500) table
    saved = json.loads((tmp_path / "expert" / "config.json").read_text())
    base = json.loads((tiny_setup["base"] / "config.json").read_text())
    assert saved["max_source_positions"] == base["max_source_positions"] == 500
    table = "model.encoder.embed_positions.weight"
    assert torch.equal(load_state(tmp_path / "expert")[table], load_state(tiny_setup["base"])[table])
    assert set(load_state(tmp_path / "expert")) == set(load_state(tiny_setup["base"]))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_setup, tmp_path):
    whole = tmp_path / "whole"
    train(config(tiny_setup, whole, save_every=2))
    again = tmp_path / "again"
    train(config(tiny_setup, again, save_every=2))

    def stop_at_three(step, record):
        if step == 3:
            raise KeyboardInterrupt
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_setup, resumed, save_every=2), on_step=stop_at_three)
    assert not resumed.exists() and (tmp_path / "resumed.partial" / "checkpoints" / "step-0000002").is_dir()
    train(config(tiny_setup, resumed, save_every=2))
    reference, repeat, result = (load_state(p) for p in (whole, again, resumed))
    for name in reference:
        assert torch.equal(reference[name], repeat[name]), name  # deterministic with a seed
        torch.testing.assert_close(result[name], reference[name], rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "resumed.partial").exists()
    steps = [json.loads(l)["step"] for l in (resumed / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5, 6]  # replayed steps are not logged twice


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_setup, tmp_path, monkeypatch):
    from accelerate import Accelerator
    original, calls = Accelerator.save_state, []

    def failing_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "half-written").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)
    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    out = tmp_path / "expert"
    with pytest.raises(LorsError, match="disk full.*step-0000002"):
        train(config(tiny_setup, out, save_every=2))
    checkpoints = sorted(p.name for p in (tmp_path / "expert.partial" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002"]
    monkeypatch.setattr(Accelerator, "save_state", original)
    train(config(tiny_setup, out, save_every=2))  # resumes from step 2
    reference = tmp_path / "reference"
    train(config(tiny_setup, reference, save_every=2))
    for name, tensor in load_state(reference).items():
        torch.testing.assert_close(load_state(out)[name], tensor, rtol=1e-5, atol=1e-6)


def test_freeze_encoder_caches_outputs_and_keeps_the_encoder(tiny_setup, tmp_path):
    cache = tmp_path / "cache"
    train(config(tiny_setup, tmp_path / "a", mode="freeze-encoder", cache_dir=str(cache)))
    files = sorted((cache / "encoder-outputs").rglob("*.npy"))
    assert len(files) == 12  # 8 train + 4 dev clips, once each
    stamps = [f.stat().st_mtime_ns for f in files]
    train(config(tiny_setup, tmp_path / "b", mode="freeze-encoder", cache_dir=str(cache),
                 pairs=[("de", "asr"), ("de", "st")]))
    assert [f.stat().st_mtime_ns for f in sorted((cache / "encoder-outputs").rglob("*.npy"))] == stamps
    base, trained = load_state(tiny_setup["base"]), load_state(tmp_path / "b")
    changed = {n for n in base if not torch.equal(base[n], trained[n])}
    assert changed and all(n.startswith("model.decoder.") or n == "proj_out.weight" for n in changed), changed


def test_lora_saves_an_adapter_and_merged_weights(tiny_setup, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration
    out = tmp_path / "lora"
    train(config(tiny_setup, out, mode="lora", learning_rate=1e-2))
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = WhisperForConditionalGeneration.from_pretrained(out).eval()
    base = WhisperForConditionalGeneration.from_pretrained(tiny_setup["base"])
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    features = torch.randn(1, 16, 1000)
    decoder = torch.tensor([[257, 259, 262, 266]])
    with torch.no_grad():
        a = merged(input_features=features, decoder_input_ids=decoder).logits
        b = with_adapter(input_features=features, decoder_input_ids=decoder).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    state, base_state = load_state(out), load_state(tiny_setup["base"])
    assert set(state) == set(base_state)
    assert not torch.equal(state["model.decoder.layers.0.fc1.weight"],
                           base_state["model.decoder.layers.0.fc1.weight"])


def test_sequential_saves_each_stage_and_chains_them(tiny_setup, tmp_path):
    out = tmp_path / "seq"
    summary = train(config(tiny_setup, out, sequential=True, max_steps=3,
                           pairs=[("de", "asr"), ("fr", "asr")]))
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert stages == ["01-de-asr", "02-fr-asr"]
    assert summary["stages"][1]["base"] == str(out.with_name("seq.partial") / "stages" / "01-de-asr")
    final, last = load_state(out), load_state(out / "stages" / "02-fr-asr")
    assert all(torch.equal(final[n], last[n]) for n in final)


def test_trained_experts_merge_unchanged(tiny_setup, tmp_path):
    from lors.merging import merge, validate_config
    for language in ("de", "fr"):
        train(config(tiny_setup, tmp_path / language, pairs=[(language, "asr")], max_steps=2))
    merge_config = validate_config({"base": str(tiny_setup["base"]), "method": "lors",
                                    "parameters": {"rank": 2},
                                    "experts": [{"name": l, "path": str(tmp_path / l)} for l in ("de", "fr")]})
    merge(merge_config, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


def test_balanced_stream_gives_every_pair_the_same_share():
    stream = example_stream([10, 3, 5], seed=1, count=300)
    counts = np.bincount([p for p, _ in stream])
    assert counts.tolist() == [100, 100, 100]
    assert example_stream([10, 3, 5], seed=1, count=50) == stream[:50]
    small = [i for p, i in stream[:9] if p == 1]
    assert sorted(small) == [0, 1, 2]  # each pair walks through an epoch before repeating


def test_bad_input_is_refused_before_training(tiny_setup, tmp_path):
    with pytest.raises(LorsError, match="no train utterances with audio for en/asr.*de/train: 8"):
        train(config(tiny_setup, tmp_path / "x", pairs=[("en", "asr")]))
    with pytest.raises(LorsError, match=r"no language token <\|sv\|>.*knows de, en, fr"):
        train(config(tiny_setup, tmp_path / "x", pairs=[("sv", "asr")]))
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        train(config(tiny_setup, tmp_path / "exists"))
    long = [u if u.id != "de-train-0" else Utterance(**{**u.__dict__, "duration": 31.0})
            for u in tiny_setup["utterances"]]
    with pytest.raises(LorsError, match="'de-train-0'.*31.0 s.*at most 30 s"):
        train(config(tiny_setup, tmp_path / "x"), utterances=long)
    missing = [Utterance(**{**u.__dict__, "audio": "/nonexistent/a.wav"}) if i < 3 else u
               for i, u in enumerate(tiny_setup["utterances"])]
    with pytest.raises(LorsError, match="3 of 12 selected utterances.*no audio"):
        train(config(tiny_setup, tmp_path / "x"), utterances=missing)
    summary = train(config(tiny_setup, tmp_path / "ok", max_steps=1, max_missing_fraction=0.5),
                    utterances=missing)
    assert summary["skipped_missing_audio"] == 3 and summary["train_utterances"] == {"de-asr": 5}
    with pytest.raises(ValueError, match="ISO 639-1"):
        config(tiny_setup, tmp_path / "x", pairs=[("German", "asr")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_sequential_run_resumes_inside_its_second_stage(tiny_setup, tmp_path):
    pairs = [("de", "asr"), ("fr", "asr")]
    train(config(tiny_setup, tmp_path / "whole", sequential=True, save_every=2, pairs=pairs))
    seen = []

    def stop_in_stage_two(step, record):
        seen.append(step)
        if len(seen) == 6 + 3:  # stage 1 has 6 steps; stop after step 3 of stage 2
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_setup, tmp_path / "seq", sequential=True, save_every=2, pairs=pairs),
              on_step=stop_in_stage_two)
    assert (tmp_path / "seq.partial" / "stages" / "01-de-asr" / "training.json").is_file()
    train(config(tiny_setup, tmp_path / "seq", sequential=True, save_every=2, pairs=pairs))
    reference = load_state(tmp_path / "whole")
    for name, tensor in load_state(tmp_path / "seq").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


def test_cli_trains_and_reports_bad_input(tiny_setup, tmp_path, capsys):
    from lors.cli import main
    args = ["train", "--base", str(tiny_setup["base"]), "--manifest", str(tiny_setup["manifest"]),
            "--languages", "de", "--tasks", "asr", "--max-steps", "2", "--batch-size", "4",
            "--cache-dir", str(tmp_path / "cache"), "--cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "de-asr")]) == 0
    assert "trained de-asr (full): 8 samples" in capsys.readouterr().out
    assert (tmp_path / "de-asr" / "model.safetensors").is_file()
    assert main(args + ["--out", str(tmp_path / "de-asr")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(args[:5] + ["--languages", "xx", "--out", str(tmp_path / "bad")]) == 2
    assert "no language token <|xx|>" in capsys.readouterr().err
