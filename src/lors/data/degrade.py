"""Seeded degradation of synthetic speech: reverberation and additive noise.

:class:`Augmentation` holds the ranges (SNR in dB, RT60 in seconds); per utterance it draws a
:class:`Degradation` (an SNR, a noise colour, an RT60), seeded by the utterance id, which
reverberates with a synthetic room impulse response, adds white, pink or brown noise at the
drawn SNR and peak-normalises to -1 dBFS. Every draw and every noise sample is a function of
:data:`SEED` and the utterance id, so a re-run renders the same audio.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import LorsError
from .audio import (NOISE_COLOURS, add_noise, coloured_noise, peak_normalise, reverberate,
                    room_impulse_response)

SEED = "lors-synth-v2"
"""Every seeded choice of synthetic speech (voices too) hashes this with its inputs."""

# Accepted ranges of the degradation settings.
SNR_LIMITS = (-20.0, 80.0)  # dB
RT60_LIMITS = (0.05, 3.0)  # seconds


def seed_of(*parts: str) -> int:
    """A 64-bit seed from a SHA-256 of :data:`SEED` and ``parts``."""
    digest = hashlib.sha256("\0".join((SEED, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _range(value: Any, name: str, limits: tuple[float, float], unit: str,
           example: str) -> tuple[float, float] | None:
    """``value`` ("LO,HI", "X", [lo, hi] or a number) as a checked (lo, hi); None stays None."""
    if value is None:
        return None
    example = f"e.g. {name} {example}"
    if isinstance(value, str):
        parts: list = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        if len(parts) not in (1, 2) or any(isinstance(p, bool) for p in parts):
            raise ValueError
        lo, hi = float(parts[0]), float(parts[-1])
    except (TypeError, ValueError):
        raise LorsError(f"{name} expects LO,HI (two numbers in {unit}), got {value!r}; "
                        f"{example}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi \
            or lo < limits[0] or hi > limits[1]:
        raise LorsError(f"{name} {lo:g},{hi:g} is not a range LO <= HI within "
                        f"{limits[0]:g}..{limits[1]:g} {unit}; {example}")
    return (lo, hi)


@dataclass(frozen=True)
class Degradation:
    """The degradation drawn for one utterance: None fields are not applied."""

    utterance_id: str
    noise_snr: float | None = None  # dB, rounded to 0.1
    noise_colour: str | None = None
    reverb_rt60: float | None = None  # seconds, rounded to 0.01

    @property
    def label(self) -> str:
        """The applied settings, e.g. ``rt60 0.45 s, pink noise 12.3 dB SNR``."""
        parts = []
        if self.reverb_rt60 is not None:
            parts.append(f"rt60 {self.reverb_rt60:g} s")
        if self.noise_snr is not None:
            parts.append(f"{self.noise_colour} noise {self.noise_snr:g} dB SNR")
        return ", ".join(parts) or "clean"

    def apply(self, audio: np.ndarray) -> np.ndarray:
        """Reverberate, add noise and peak-normalise ``audio`` (float32 out, never clipping).

        The room response and the noise come from their own seeded generators, so the same
        utterance gets the same room with or without noise and the same noise with or
        without reverberation. The SNR is measured against the (reverberant) speech over
        the whole clip; normalisation scales speech and noise alike, keeping it.
        """
        samples = np.asarray(audio, dtype=np.float64)
        if self.reverb_rt60 is not None:
            rng = np.random.default_rng(seed_of(self.utterance_id, "rir"))
            samples = reverberate(samples, room_impulse_response(self.reverb_rt60, rng))
        if self.noise_snr is not None:
            rng = np.random.default_rng(seed_of(self.utterance_id, "noise"))
            noise = coloured_noise(len(samples), self.noise_colour, rng)
            samples = add_noise(samples, noise, self.noise_snr)
        return peak_normalise(samples).astype(np.float32)


@dataclass(frozen=True)
class Augmentation:
    """Optional seeded degradation of synthetic speech.

    ``noise_snr`` (dB) and ``reverb_rt60`` (seconds) are (lo, hi) ranges; per utterance a
    value is drawn uniformly from each set range (and a noise colour from white, pink and
    brown), seeded by the utterance id. Neither set: clean speech.
    """

    noise_snr: tuple[float, float] | None = None
    reverb_rt60: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_snr", _range(self.noise_snr, "noise_snr",
                                                     SNR_LIMITS, "dB", "5,30"))
        object.__setattr__(self, "reverb_rt60", _range(self.reverb_rt60, "reverb_rt60",
                                                       RT60_LIMITS, "s", "0.2,0.8"))

    @classmethod
    def coerce(cls, value: "Augmentation | Mapping[str, Any] | None") -> "Augmentation":
        """An Augmentation from itself, None (clean) or a mapping such as
        ``{"noise_snr": "5,20", "reverb_rt60": [0.2, 0.8]}`` (None values are unset)."""
        if value is None or isinstance(value, Augmentation):
            return value or cls()
        if not isinstance(value, Mapping):
            raise LorsError("augment must be a mapping like {noise_snr: [5, 20], "
                            f"reverb_rt60: [0.2, 0.8]}}, got {type(value).__name__}")
        unknown = sorted(set(value) - {"noise_snr", "reverb_rt60"})
        if unknown:
            raise LorsError(f"unknown augment setting(s) {', '.join(map(str, unknown))}; "
                            "use noise_snr and/or reverb_rt60")
        return cls(noise_snr=value.get("noise_snr"), reverb_rt60=value.get("reverb_rt60"))

    def __bool__(self) -> bool:
        return self.noise_snr is not None or self.reverb_rt60 is not None

    def as_dict(self) -> dict[str, list[float]]:
        """The set ranges, e.g. ``{"noise_snr": [5.0, 20.0]}`` (empty when clean)."""
        return {key: list(value) for key, value in
                (("noise_snr", self.noise_snr), ("reverb_rt60", self.reverb_rt60))
                if value is not None}

    @property
    def suffix(self) -> str:
        """A folder suffix naming the settings, e.g. ``-snr5_20-rt60_0.2_0.8``; "" if clean.
        Degraded and clean speech (and different settings) thus never share a folder."""
        out = ""
        if self.noise_snr is not None:
            out += f"-snr{self.noise_snr[0]:g}_{self.noise_snr[1]:g}"
        if self.reverb_rt60 is not None:
            out += f"-rt60_{self.reverb_rt60[0]:g}_{self.reverb_rt60[1]:g}"
        return out

    def draw(self, utterance_id: str) -> Degradation | None:
        """The seeded degradation of ``utterance_id``; None when clean."""
        if not self:
            return None
        snr = colour = rt60 = None
        if self.noise_snr is not None:
            lo, hi = self.noise_snr
            u = np.random.default_rng(seed_of(utterance_id, "snr")).random()
            snr = round(lo + (hi - lo) * u, 1) + 0.0  # + 0.0: no -0.0
            colour = NOISE_COLOURS[seed_of(utterance_id, "colour") % len(NOISE_COLOURS)]
        if self.reverb_rt60 is not None:
            lo, hi = self.reverb_rt60
            u = np.random.default_rng(seed_of(utterance_id, "rt60")).random()
            rt60 = round(lo + (hi - lo) * u, 2)
        return Degradation(utterance_id, snr, colour, rt60)
