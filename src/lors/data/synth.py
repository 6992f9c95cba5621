"""Synthetic multilingual speech: render the sentence bank with espeak-ng.

Layout of an output folder::

    out_dir/<lang>/<split>/<sid>.wav    16 kHz mono 16-bit PCM
    out_dir/manifest.jsonl              one Utterance per rendered (sentence, language)

Speaker variety comes from espeak-ng voice variants (formant voices ``m*``/``f*``, Klatt
voices and named variants), rates, pitches and word gaps. Dev and test use variants, rates
and pitches never used in train, so evaluation measures generalisation to unseen voices.
Every choice is a seeded hash of (sentence id, language): re-runs are reproducible.

Optional degradation (:class:`lors.data.degrade.Augmentation`: reverberation and noise, seeded
by the utterance id) is a post-step on the rendered audio before it is written; the applied
values go to the manifest (``noise_snr``, ``reverb_rt60``).

Each WAV carries its render key (:func:`render_key`: render version, voice settings and
degradation) in its INFO comment. A re-run keeps a finished WAV only when its key is the
current one, so a changed voice plan or degradation re-renders instead of silently reusing
stale audio, while a killed run still resumes where it stopped.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..errors import LorsError
from ..names import name_list
from .audio import SAMPLE_RATE, is_valid_wav, resample, write_wav
from .degrade import Augmentation, Degradation, seed_of
from .manifest import Utterance, write_manifest

# "fr", not "fr-fr": espeak-ng 1.51 ignores a variant after "fr-fr" (fr-fr+f3 is fr-fr).
ESPEAK_VOICES: dict[str, str] = {
    "ca": "ca", "de": "de", "en": "en", "es": "es", "fr": "fr", "id": "id", "it": "it",
    "nl": "nl", "pt": "pt", "ru": "ru", "sv": "sv",
}

INSTALL_HINT = ("install it with `sudo apt-get install espeak-ng` "
                "(or `apt-get install espeak-ng` as root)")

# Train and held-out (dev/test) variants, rates and pitches are disjoint by construction: see
# voice_plan(). Variants are espeak-ng's (`espeak-ng --voices=variant`), each checked to
# change the voice of every language in ESPEAK_VOICES; both sets mix male and female
# formant voices, Klatt voices and named variants.
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m8", "f1", "f2", "f4", "klatt", "klatt3",
                  "klatt5", "Annie", "linda", "paul", "robert", "michel", "steph")
HELDOUT_VARIANTS = ("m5", "m7", "f3", "f5", "klatt2", "klatt4", "belinda", "Gene", "travis")
TRAIN_RATES = (110, 120, 130, 140, 150, 160, 170, 180)  # words per minute
HELDOUT_RATES = (115, 125, 135, 145, 155, 165, 175)
TRAIN_PITCHES = (20, 30, 40, 50, 60, 70, 80)  # espeak-ng -p, 0-99
HELDOUT_PITCHES = (25, 35, 45, 55, 65, 75)
GAPS = (1, 2, 3, 4, 5, 6)  # extra pause between words, 10 ms units
# Part of every WAV's render key: bump it when the same settings would render other audio
# (a new resampler, another degradation recipe), so older renders are not reused.
RENDER_VERSION = "lors-synth-v2"
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
    return options[seed_of(sid, language, what) % len(options)]


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


def render_key(plan: VoicePlan, degradation: Degradation | None = None) -> str:
    """What a WAV was rendered with, stored in its INFO comment, e.g.
    ``lors-synth-v2; de+m3 s130 p50 g4; clean``."""
    return f"{RENDER_VERSION}; {plan.label}; {degradation.label if degradation else 'clean'}"


def check_espeak() -> str:
    """Return the path of the ``espeak-ng`` executable, or raise with the install command."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise LorsError(f"espeak-ng was not found on PATH; {INSTALL_HINT}, then re-run")
    return path


def speak(espeak: str, text: str, plan: VoicePlan, out: Path | str = "audio") -> np.ndarray:
    """Speak ``text`` with ``plan``; return 16 kHz mono float32 samples (``out`` names the
    target in errors).

    The text goes through stdin as UTF-8 (``-b 1``), so quotes, apostrophes, leading dashes
    and non-ASCII letters reach espeak-ng unchanged.
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
    return resample(samples[:, 0], rate, SAMPLE_RATE)


def render(espeak: str, text: str, plan: VoicePlan, out: Path,
           degradation: Degradation | None = None) -> float:
    """Speak ``text`` with ``plan``, degrade it if asked, and write a 16 kHz mono WAV to
    ``out`` (atomically, with its :func:`render_key` as comment); return seconds."""
    audio = speak(espeak, text, plan, out)
    if degradation is not None:
        audio = degradation.apply(audio)
    write_wav(out, audio, SAMPLE_RATE, comment=render_key(plan, degradation))
    return len(audio) / SAMPLE_RATE


def _finished_duration(path: Path, key: str) -> float | None:
    """Duration of an already rendered, complete 16 kHz mono WAV whose render key is ``key``,
    or None to render it (again): missing, partial, or rendered with other settings."""
    if not is_valid_wav(path):
        return None
    try:
        with sf.SoundFile(str(path)) as handle:
            if handle.samplerate != SAMPLE_RATE or handle.channels != 1 \
                    or handle.comment != key:
                return None
            return handle.frames / SAMPLE_RATE
    except (OSError, RuntimeError, sf.SoundFileError):
        return None


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
    degradation: Degradation | None


def _plan_jobs(sentences, languages: list[str], out_dir: Path,
               augment: Augmentation) -> list[_Job]:
    """One job per (language, sentence), ordered by language, then the bank's order."""
    jobs = []
    for language in languages:
        for sentence in sentences:
            plan = voice_plan(sentence.sid, language, sentence.split)
            path = out_dir / language / sentence.split / f"{sentence.sid}.wav"
            uid = f"{language}-{sentence.split}-{sentence.sid}"
            degradation = augment.draw(uid)
            utt = Utterance(id=uid, language=language, split=sentence.split, audio=str(path),
                            duration=0.0, transcript=sentence.text(language),
                            translation=sentence.text("en"), voice=plan.label,
                            noise_snr=degradation and degradation.noise_snr,
                            reverb_rt60=degradation and degradation.reverb_rt60)
            jobs.append(_Job(utt, plan, degradation))
    return jobs


def synthesize(languages: str | Iterable[str], splits: str | Iterable[str],
               out_dir: str | Path, *, limit_per_split: int | None = None,
               jobs: int | None = None, bank_dir: str | Path | None = None,
               show_progress: bool = True,
               augment: Augmentation | Mapping[str, Any] | None = None) -> Path:
    """Render the bank's sentences for ``languages`` x ``splits``; return the manifest path.

    Languages, splits and ``augment`` are validated, and espeak-ng located, before anything
    is written. ``limit_per_split`` keeps the first N sentences of each split; ``jobs``
    espeak-ng processes run at once (default ``os.cpu_count()``). ``augment`` (an
    :class:`Augmentation` or a mapping like ``{"noise_snr": "5,20", "reverb_rt60": [0.2,
    0.8]}``) degrades every clip; it writes into ``out_dir`` as given, so give degraded
    speech its own folder (e.g. with :attr:`Augmentation.suffix`). Finished valid 16 kHz mono
    WAVs with the current render key are kept untouched; missing, corrupt, partial ones and
    those rendered with other settings are rendered again. The manifest
    ``out_dir/manifest.jsonl`` lists exactly this call's utterances and replaces any older one.
    """
    from .sentences import select

    languages, splits = _validate(languages, splits)
    augment = Augmentation.coerce(augment)
    espeak = check_espeak()
    sentences = select(languages, splits, limit_per_split=limit_per_split, bank_dir=bank_dir)
    if not sentences:
        raise LorsError(f"the sentence bank has no sentences for splits {', '.join(splits)}")
    out_dir = Path(out_dir)
    planned = _plan_jobs(sentences, languages, out_dir, augment)
    # No sweep here: a killed run's temporaries go when the same file is written again (fsutil).

    def run(job: _Job) -> Utterance:
        path = Path(job.utterance.audio)
        duration = _finished_duration(path, render_key(job.plan, job.degradation))
        if duration is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            duration = render(espeak, job.utterance.transcript, job.plan, path,
                              job.degradation)
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
