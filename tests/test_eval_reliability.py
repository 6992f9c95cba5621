"""`lors eval` refuses unsafe or truncated weights and an existing --out before decoding,
decodes clips over the full window long-form instead of cutting them, and says what it takes."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_speech
from lors.cli import build_parser, main
from lors.data.audio import write_wav
from lors.data.manifest import Utterance, write_manifest
from lors.errors import CheckpointError, LorsError, OutputExistsError
from lors.evaluation import Decoder, evaluate
from lors.evaluation.window import window_for
from lors.tiny import FIRST_SPECIAL, SPECIALS, save_tiny_base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Whisper whose full window is 1 s, as the other eval tests use."""
    return save_tiny_base(tmp_path_factory.mktemp("rel-tiny") / "base")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel-clips")
    return write_manifest(root / "manifest.jsonl", make_tiny_speech(root, {"test": 2}, ("de",)))


def _copy_model(tiny: Path, folder: Path) -> Path:
    shutil.copytree(tiny, folder)
    return folder


def _no_decoding(monkeypatch) -> None:
    """Make any decoding attempt fail the test: every check must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("decoding started before the input checks finished")
    monkeypatch.setattr(Decoder, "decode", refuse)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["eval", *argv, "--quiet"])
    return code, capsys.readouterr().err


def _assert_one_line_error(err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lors: error: "), err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in err
    return lines[0]


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# ---------------------------------------------------------------- unsafe and broken weights


def test_code_executing_pickle_is_refused_without_suggesting_weights_only_false(
        tiny, manifest, tmp_path, capsys, monkeypatch):
    model = _copy_model(tiny, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    torch.save({"model.encoder.conv1.weight": _Payload(marker)}, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()  # else the reader and transformers prefer it
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    _no_decoding(monkeypatch)
    code, err = _cli(capsys, str(model), "--manifest", str(manifest), "--out",
                     str(out_dir / "r.json"))
    assert code == 2
    line = _assert_one_line_error(err, "pytorch_model.bin", "code execution", "safetensors",
                                  "trusted environment")
    assert "weights_only" not in line
    assert not marker.exists()  # the pickle's code never ran
    assert list(out_dir.iterdir()) == []  # no output, no temporary


def test_truncated_safetensors_is_refused_naming_the_file(tiny, manifest, tmp_path, capsys,
                                                          monkeypatch):
    model = _copy_model(tiny, tmp_path / "cut")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    _no_decoding(monkeypatch)
    code, err = _cli(capsys, str(model), "--manifest", str(manifest), "--out",
                     str(out_dir / "r.json"))
    assert code == 2
    _assert_one_line_error(err, str(weights), "truncated")
    assert list(out_dir.iterdir()) == []
    with pytest.raises(CheckpointError, match="truncated"):
        Decoder(model)


# ---------------------------------------------------------------- --out and --force


def test_existing_out_is_refused_before_any_model_is_loaded(manifest, tmp_path, capsys,
                                                            monkeypatch):
    out = tmp_path / "results.json"
    out.write_text("keep me")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    module = sys.modules["lors.evaluation.evaluate"]  # the package's name is the function
    monkeypatch.setattr(module, "Decoder", no_model)
    monkeypatch.setattr(module, "resolve_model_reference", no_model)
    code, err = _cli(capsys, "base", "--manifest", str(manifest), "--out", str(out))
    assert code == 2
    _assert_one_line_error(err, str(out), "already exists", "--force")
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(OutputExistsError):
        evaluate("base", manifest, out=out)


def test_force_replaces_out_atomically(tiny, manifest, tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("old")
    code = main(["eval", str(tiny), "--manifest", str(manifest), "--max-new-tokens", "2",
                 "--out", str(out), "--force", "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text(encoding="utf-8"))
    assert {u["id"] for u in report["utterances"]} == {"de-test-0", "de-test-1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary


def test_out_that_is_a_directory_is_refused(manifest, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    code, err = _cli(capsys, "base", "--manifest", str(manifest), "--out", str(folder),
                     "--force")
    assert code == 2
    _assert_one_line_error(err, str(folder), "is a directory")
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------- what the model argument takes


def test_help_says_hub_ids_are_not_downloaded_and_they_are_refused(manifest, capsys):
    parser = build_parser()
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    text = " ".join(eval_parser.format_help().split())
    assert "hub id," not in text and "hub ids are not downloaded" in text
    code, err = _cli(capsys, "openai/whisper-tiny", "--manifest", str(manifest))
    assert code == 2
    _assert_one_line_error(err, "openai/whisper-tiny", "not a directory",
                           "hub ids are not downloaded")


# ---------------------------------------------------------------- clips over the full window


@pytest.fixture(scope="module")
def long_setup(tmp_path_factory) -> tuple[Path, list[Utterance]]:
    """A tiny Whisper with Whisper's 30 s window and its 1501 timestamp tokens (0.00-30.00 s;
    with fewer, each random segment ends within a second and 35 s take minutes), a 35 s
    clip, a 2 s clip, and a 35 s clip whose manifest claims 2 s."""
    root = tmp_path_factory.mktemp("rel-long")
    model = save_tiny_base(root / "base30", chunk_seconds=30,
                           vocab_size=FIRST_SPECIAL + len(SPECIALS) + 1501)
    rng = np.random.default_rng(3)
    utterances = []
    for uid, seconds, stated in (("long", 35.0, 35.0), ("short", 2.0, 2.0), ("liar", 35.0, 2.0)):
        path = root / f"{uid}.wav"
        write_wav(path, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32))
        utterances.append(Utterance(id=uid, language="de", split="test", audio=str(path),
                                    duration=stated, transcript="hallo welt",
                                    translation="hello world"))
    return model, utterances


def _record_generate(decoder: Decoder) -> list[dict]:
    """Record each generate call's feature frames, mask and timestamp mode."""
    calls: list[dict] = []
    original = decoder.model.generate

    def generate(**kwargs):
        mask = kwargs.get("attention_mask")
        calls.append({"frames": kwargs["input_features"].shape[-1],
                      "batch": kwargs["input_features"].shape[0],
                      "mask": None if mask is None else mask.sum(-1).tolist(),
                      "timestamps": kwargs["return_timestamps"]})
        return original(**kwargs)
    decoder.model.generate = generate
    return calls


def test_long_clip_is_decoded_long_form_uncut(long_setup):
    model, (long, short, liar) = long_setup
    decoder = Decoder(model)
    calls = _record_generate(decoder)
    segments: list[int] = []
    decoder.model.model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: segments.append(kwargs["input_features"].shape[-1]),
        with_kwargs=True)
    texts = decoder.decode([short, long], "de", "asr", batch_size=8, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) and t == t.strip() for t in texts)
    # batched apart: the 35 s clip alone, with all 3500 frames and timestamps (long-form)
    assert {"frames": 3500, "batch": 1, "mask": [3500], "timestamps": True} in calls
    assert {"frames": 800, "batch": 1, "mask": None, "timestamps": False} in calls  # 8 s min
    assert len(calls) == 2
    assert segments.count(800) == 1 and segments.count(3000) >= 2  # 30 s segments, not one
    assert decoder.model.config.max_source_positions == 1500
    calls.clear()
    decoder.decode([liar], "de", "asr", max_new_tokens=4)  # its audio, not its manifest, rules
    assert calls == [{"frames": 3500, "batch": 1, "mask": [3500], "timestamps": True}]
    calls.clear()
    decoder.decode([short], "de", "asr", max_new_tokens=2, window_seconds=1)  # 2 s clip
    assert calls[0]["frames"] == 800  # the window is widened to fit it, not the clip cut


def test_evaluate_reports_long_clips_and_their_segment_budget(long_setup, tmp_path):
    model, (long, short, _) = long_setup
    out = tmp_path / "r.json"
    report = evaluate(model, [long, short], max_new_tokens=3, out=out)
    assert [u["id"] for u in report["utterances"]] == ["long", "short"]
    assert report["settings"]["long_form_max_new_tokens"] == 20  # half the tiny context
    assert json.loads(out.read_text(encoding="utf-8")) == report


def test_long_clips_without_timestamp_support_are_refused_by_id(long_setup, tmp_path):
    model, (long, short, _) = long_setup
    decoder = Decoder(model)
    decoder.model.generation_config.no_timestamps_token_id = None
    with pytest.raises(LorsError, match=r"clip\(s\) 'long' are longer than the 30 s.*split"):
        decoder.decode([short, long], "de", "asr")


def test_an_explicit_window_never_cuts_a_clip():
    hop = 160
    assert window_for(16000 * 10, 8, 1500, hop).seconds == 12  # widened to the automatic one
    assert window_for(16000 * 8, 8, 1500, hop).seconds == 8  # it fits: used as given
    assert window_for(16000 * 35, 8, 1500, hop).positions == 1500  # capped: long-form


def test_eval_refuses_a_model_with_missing_weights(tmp_path, capsys):
    """transformers would fill a missing tensor randomly; lors eval refuses the folder."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lors.cli import main
    from lors.tiny import save_tiny_base
    model = save_tiny_base(tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors.pop("model.decoder.layers.1.fc2.weight")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    from conftest import make_tiny_speech
    from lors.data.manifest import write_manifest
    manifest = write_manifest(tmp_path / "manifest.jsonl",
                              make_tiny_speech(tmp_path, {"test": 1}))
    code = main(["eval", str(model), "--manifest", str(manifest), "--languages", "de"])
    err = capsys.readouterr().err
    assert code == 2 and "weights do not fit its config" in err
    assert "model.decoder.layers.1.fc2.weight" in err
    shutil.rmtree(model)
