"""Synthetic multilingual speech: render the sentence bank with espeak-ng.

Layout of an output folder::

    out_dir/<lang>/<split>/<sid>.wav    16 kHz mono 16-bit PCM
    out_dir/manifest.jsonl              one Utterance per rendered (sentence, language)

Speaker variety comes from espeak-ng voice variants, rates, pitches and word gaps. Dev and
test use variants never used in train, so evaluation measures generalisation to unseen
voices. Every choice is a seeded hash of (sentence id, language): re-runs are reproducible.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import soundfile as sf
from tqdm import tqdm

from ..errors import LorsError
from ..names import name_list
from .audio import SAMPLE_RATE, is_valid_wav, resample, write_wav
from .manifest import Utterance, write_manifest

ESPEAK_VOICES: dict[str, str] = {
    "ca": "ca", "de": "de", "en": "en", "es": "es", "fr": "fr-fr", "id": "id", "it": "it",
    "nl": "nl", "pt": "pt", "ru": "ru", "sv": "sv",
}

INSTALL_HINT = ("install it with `sudo apt-get install espeak-ng` "
                "(or `apt-get install espeak-ng` as root)")

# Train and held-out (dev/test) variants are disjoint by construction: see voice_plan().
TRAIN_VARIANTS = ("m1", "m3", "f2", "f4")
HELDOUT_VARIANTS = ("m7", "f3")
TRAIN_RATES = (120, 130, 140, 150)
HELDOUT_RATES = (125, 135)
TRAIN_PITCHES = (35, 45, 55, 65)
HELDOUT_PITCHES = (40, 50, 60)
GAPS = (3, 4, 5)
SEED = "lors-synth-v1"
ESPEAK_TIMEOUT_S = 120


@dataclass(frozen=True)
class VoicePlan:
    """The espeak-ng settings for one utterance: voice with variant, rate, pitch, word gap."""

    voice: str
    rate: int
    pitch: int
    gap: int

    @property
    def label(self) -> str:
        """Human-readable settings stored in the manifest, e.g. ``de+m3 s130 p50 g4``."""
        return f"{self.voice} s{self.rate} p{self.pitch} g{self.gap}"

    def args(self) -> list[str]:
        """espeak-ng command-line options for these settings."""
        return ["-v", self.voice, "-s", str(self.rate), "-p", str(self.pitch),
                "-g", str(self.gap)]


def espeak_voice(language: str) -> str:
    """The base espeak-ng voice of ``language``; unknown codes raise :class:`LorsError`."""
    try:
        return ESPEAK_VOICES[language]
    except KeyError:
        raise LorsError(f"no espeak-ng voice for language {language!r}; supported: "
                        f"{', '.join(sorted(ESPEAK_VOICES))}") from None


def _pick(options: Sequence, sid: str, language: str, what: str):
    """Choose one of ``options`` by a seeded SHA-256 of (sid, language, what)."""
    digest = hashlib.sha256(f"{SEED}\0{sid}\0{language}\0{what}".encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def voice_plan(sid: str, language: str, split: str) -> VoicePlan:
    """Deterministic voice settings for sentence ``sid`` in ``language`` and ``split``.

    Train draws from :data:`TRAIN_VARIANTS`, dev and test from :data:`HELDOUT_VARIANTS`.
    """
    train = split == "train"
    variant = _pick(TRAIN_VARIANTS if train else HELDOUT_VARIANTS, sid, language, "variant")
    rate = _pick(TRAIN_RATES if train else HELDOUT_RATES, sid, language, "rate")
    pitch = _pick(TRAIN_PITCHES if train else HELDOUT_PITCHES, sid, language, "pitch")
    gap = _pick(GAPS, sid, language, "gap")
    return VoicePlan(f"{espeak_voice(language)}+{variant}", rate, pitch, gap)


def check_espeak() -> str:
    """Return the path of the ``espeak-ng`` executable, or raise with the install command."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise LorsError(f"espeak-ng was not found on PATH; {INSTALL_HINT}, then re-run")
    return path


def render(espeak: str, text: str, plan: VoicePlan, out: Path) -> float:
    """Speak ``text`` with ``plan`` and write a 16 kHz mono WAV to ``out``; return seconds.

    The text goes through stdin as UTF-8 (``-b 1``), so quotes, apostrophes, leading dashes
    and non-ASCII letters reach espeak-ng unchanged. The WAV is written atomically.
    """
    try:
        proc = subprocess.run([espeak, "-b", "1", *plan.args(), "--stdout"],
                              input=text.encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LorsError(f"espeak-ng failed to render {out}: {exc}") from exc
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip() or "no audio produced"
        raise LorsError(f"espeak-ng ({plan.label}) failed to render {out}: {err}")
    # --stdout streams, so the WAV header holds placeholder sizes; libsndfile reads to EOF.
    try:
        samples, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    except (RuntimeError, sf.SoundFileError) as exc:
        raise LorsError(f"espeak-ng ({plan.label}) wrote undecodable audio for {out}: {exc}"
                        ) from exc
    audio = resample(samples[:, 0], rate, SAMPLE_RATE)
    write_wav(out, audio, SAMPLE_RATE)
    return len(audio) / SAMPLE_RATE


def _finished_duration(path: Path) -> float | None:
    """Duration of an already rendered, complete 16 kHz mono WAV, or None to re-render."""
    if not is_valid_wav(path):
        return None
    info = sf.info(str(path))
    if info.samplerate != SAMPLE_RATE or info.channels != 1:
        return None
    return info.frames / SAMPLE_RATE


def _validate(languages: str | Iterable[str], splits: str | Iterable[str]):
    """Check language and split names before any work; return them as lists."""
    from .sentences import SPLITS  # lazy: keeps this module importable on its own

    languages = name_list(languages, "languages")
    splits = name_list(splits, "splits")
    for language in languages:
        espeak_voice(language)
    bad = [split for split in splits if split not in SPLITS]
    if bad:
        raise LorsError(f"unknown split(s) {', '.join(bad)}; choose from {', '.join(SPLITS)}")
    return languages, splits


@dataclass(frozen=True)
class _Job:
    utterance: Utterance  # duration filled in once rendered
    plan: VoicePlan


def _plan_jobs(sentences, languages: list[str], out_dir: Path) -> list[_Job]:
    """One job per (language, sentence), ordered by language, then the bank's order."""
    jobs = []
    for language in languages:
        for sentence in sentences:
            plan = voice_plan(sentence.sid, language, sentence.split)
            path = out_dir / language / sentence.split / f"{sentence.sid}.wav"
            utt = Utterance(id=f"{language}-{sentence.split}-{sentence.sid}",
                            language=language, split=sentence.split, audio=str(path),
                            duration=0.0, transcript=sentence.text(language),
                            translation=sentence.text("en"), voice=plan.label)
            jobs.append(_Job(utt, plan))
    return jobs


def synthesize(languages: str | Iterable[str], splits: str | Iterable[str],
               out_dir: str | Path, *, limit_per_split: int | None = None,
               jobs: int | None = None, bank_dir: str | Path | None = None,
               show_progress: bool = True) -> Path:
    """Render the bank's sentences for ``languages`` x ``splits``; return the manifest path.

    Languages and splits are validated, and espeak-ng located, before anything is written.
    ``limit_per_split`` keeps the first N sentences of each split; ``jobs`` espeak-ng
    processes run at once (default ``os.cpu_count()``). Finished valid 16 kHz mono WAVs are
    kept untouched; missing, corrupt or partial ones are rendered again. The manifest
    ``out_dir/manifest.jsonl`` lists exactly this call's utterances and replaces any older one.
    """
    from .sentences import select

    languages, splits = _validate(languages, splits)
    espeak = check_espeak()
    sentences = select(languages, splits, limit_per_split=limit_per_split, bank_dir=bank_dir)
    if not sentences:
        raise LorsError(f"the sentence bank has no sentences for splits {', '.join(splits)}")
    out_dir = Path(out_dir)
    planned = _plan_jobs(sentences, languages, out_dir)
    # No sweep here: a killed run's temporaries go when the same file is written again (fsutil).

    def run(job: _Job) -> Utterance:
        path = Path(job.utterance.audio)
        duration = _finished_duration(path)
        if duration is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            duration = render(espeak, job.utterance.transcript, job.plan, path)
        return replace(job.utterance, duration=duration)

    workers = max(1, jobs or os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        results = pool.map(run, planned)  # keeps the planned order
        done = list(tqdm(results, total=len(planned), desc="espeak-ng", unit="utt",
                         disable=not show_progress))
    finally:
        # On an error or Ctrl-C, drop the queued renders instead of finishing them all.
        pool.shutdown(wait=True, cancel_futures=True)
    return write_manifest(out_dir / "manifest.jsonl", done)
