#!/usr/bin/env bash
# Create or reuse .venv in the repository root and install lors with its test dependencies.
# torch is pinned to the CPU build first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip on some machines warns about every local index folder it skips: keep real messages only
pip_install() { .venv/bin/pip install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
pip_install -e ".[test]"
# openai-whisper without its dependencies (they would pull triton); its light ones come with
# the test extra (tiktoken, numba, more-itertools), torch and numpy are already here
if ! .venv/bin/python -c "import whisper; whisper.load_model" 2>/dev/null; then
  pip_install --no-deps "openai-whisper>=20240930"
fi
if ! command -v espeak-ng >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) || echo "note: could not install espeak-ng; lors synth needs it"
  else
    echo "note: lors synth needs espeak-ng: sudo apt-get install espeak-ng"
  fi
fi
