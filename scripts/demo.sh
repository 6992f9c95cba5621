#!/usr/bin/env bash
# The main job: set up .venv, then `lors demo`, the embedded default experiment (packaged
# Whisper base, espeak-ng speech in de/es/fr, ASR and ST experts, MTL and sequential
# baselines, LoRS / task arithmetic / TIES with a dev search, the report). A second run
# reuses every cached stage. Extra arguments go to `lors demo` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lors demo "$@"
