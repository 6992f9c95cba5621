"""Training with the real pretrained Whisper base: prompts as Whisper builds them, and a short
fine-tune on espeak-ng speech that lowers dev WER."""

from __future__ import annotations

import json

import pytest
import torch

from lors.base import ensure_base_model
from lors.training.prompts import IGNORE_INDEX, build_example, prompt_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    return ensure_base_model(show_progress=False)


@pytest.mark.parametrize("task,whisper_task", [("asr", "transcribe"), ("st", "translate")])
def test_prompts_and_labels_are_what_whisper_expects(base, task, whisper_task):
    from transformers import WhisperForConditionalGeneration, WhisperTokenizer
    tokenizer = WhisperTokenizer.from_pretrained(base)
    generation = json.loads((base / "generation_config.json").read_text())
    prompt = prompt_ids(tokenizer, "de", task)
    # Whisper's own prefix: the tokenizer's and the generation config's forced ids
    tokenizer.set_prefix_tokens(language="german", task=whisper_task, predict_timestamps=False)
    assert prompt == tokenizer.prefix_tokens
    assert prompt == [generation["decoder_start_token_id"], generation["lang_to_id"]["<|de|>"],
                      generation["task_to_id"][whisper_task], generation["no_timestamps_token_id"]]
    # ... and the prompt generate() forces
    model = WhisperForConditionalGeneration.from_pretrained(base).eval()
    from lors.evaluation.decode import _restore_whisper_generation_fields
    _restore_whisper_generation_fields(model, base)
    with torch.no_grad():
        out = model.generate(input_features=torch.zeros(1, 80, 3000), language="de",
                             task=whisper_task, max_new_tokens=1, return_timestamps=False,
                             return_dict_in_generate=True)
    generated = out.sequences[0].tolist()
    assert generated[:4] == prompt or generated[:3] == prompt[1:]  # with or without SOT

    example = build_example(tokenizer, "Der Hund spielt im Garten.", "de", task)
    body = tokenizer.encode(" Der Hund spielt im Garten.", add_special_tokens=False)
    assert list(example.decoder_input_ids) == prompt + body
    assert list(example.labels) == [IGNORE_INDEX] * 3 + body + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(body[:1]) == ["ĠDer"]  # Whisper's leading space


def test_fine_tuning_the_real_base_lowers_dev_wer(base, tmp_path):
    from lors.data.synth import synthesize
    from lors.evaluation import evaluate
    from lors.training import TrainConfig, train
    manifest = synthesize(["ca"], ["train", "dev"], tmp_path / "speech", limit_per_split=24,
                          show_progress=False)
    summary = train(TrainConfig(base=str(base), manifest=str(manifest), pairs=[("ca", "asr")],
                                out=str(tmp_path / "ca-asr"), mode="freeze-encoder",
                                max_steps=12, batch_size=8, learning_rate=1e-4, eval_every=4,
                                dev_limit=8, cache_dir=str(tmp_path / "cache"), cpu=True,
                                show_progress=False))
    assert summary["encoder_positions"] < 1500  # trained on a short window
    before = evaluate(base, manifest, languages="ca", split="dev")["results"][0]["wer"]
    after = evaluate(tmp_path / "ca-asr", manifest, languages="ca", split="dev")["results"][0]["wer"]
    print(f"ca dev WER: base {before:.3f}, fine-tuned {after:.3f}")
    assert after < before - 0.05, (before, after)


def test_demo_in_a_reduced_setting_prints_the_table_and_report(base, tmp_path, capsys):
    """`lors demo --quick`: the demo's own stages (real base, espeak speech in de/es/fr, frozen
    encoder, MTL, sequential, LoRS / task arithmetic / TIES) on a few sentences."""
    from lors.cli import main
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for name in ("base", "expert", "mtl", "sequential", "lors", "task_arithmetic", "ties"):
        assert f"\n{name} " in printed
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "report.html" in printed and "data:image/png;base64," in html
    experiment = json.loads((tmp_path / "demo" / "experiment.json").read_text())
    assert experiment["size"]["train_per_pair"] == 8 and experiment["size"]["mode"] == "freeze-encoder"
    assert {tuple(p) for p in experiment["settings"][0]["pairs"]} == {
        (l, t) for l in ("de", "es", "fr") for t in ("asr", "st")}
