"""Audio input/output: decode any clip to 16 kHz mono float32, write 16-bit WAVs atomically;
seeded degradation helpers (coloured noise, synthetic room impulse responses, peak
normalisation) for synthetic speech.

Decoding uses soundfile (libsndfile). The libsndfile this project is tested with (1.2.2,
soundfile 0.14) reads WAV, FLAC, OGG/Vorbis and MP3; older libsndfile builds (< 1.1) cannot
read MP3, in which case :func:`load_audio` raises a :class:`LorsError` that says so.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, resample_poly

from ..errors import LorsError
from ..fsutil import atomic_file

SAMPLE_RATE = 16000

# Streaming writers (espeak-ng --stdout, ffmpeg to a pipe) cannot seek back to fix the
# header, so they store a placeholder size instead of the real one. Such sizes are not a
# sign of truncation; any declared data size at or above this bound is treated as one.
_PLACEHOLDER_SIZE = 0x7FFF0000


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Resample 1-D ``samples`` from ``rate`` to ``target`` Hz with a polyphase filter.

    The up/down factors are the exact ratio reduced by their gcd (22050 -> 16000 is 320/441),
    so the output has ``ceil(len * target / rate)`` samples. Returns float32.
    """
    if rate == target:
        return np.asarray(samples, dtype=np.float32)
    g = math.gcd(int(rate), int(target))
    out = resample_poly(np.asarray(samples, dtype=np.float64), target // g, rate // g)
    return out.astype(np.float32)


def _riff_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """List ``(chunk id, declared size, payload offset)`` of a RIFF/WAVE byte string."""
    chunks = []
    offset = 12
    while offset + 8 <= len(data):
        cid, size = struct.unpack("<4sI", data[offset : offset + 8])
        chunks.append((cid, size, offset + 8))
        if cid == b"data":
            break  # the payload may be huge: do not walk past it
        offset += 8 + size + (size & 1)  # chunks are padded to even length
    return chunks


def wav_header_problem(path: Path, strict: bool = True) -> str | None:
    """Return why the RIFF/WAVE file at ``path`` is truncated or malformed, or None if fine.

    Checks that a ``fmt `` and a ``data`` chunk exist and that the data chunk's declared size
    fits in the file and is a whole number of frames. Files that are not RIFF/WAVE (FLAC,
    MP3, ...) return None: libsndfile validates those itself. With ``strict=False`` the
    placeholder sizes of streaming writers are accepted (the data then runs to end of file).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)  # fmt and data headers sit well inside the first 64 KiB
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    chunks = {cid: (size, off) for cid, size, off in _riff_chunks(head)}
    if b"fmt " not in chunks or b"data" not in chunks:
        return "no 'fmt ' or 'data' chunk in the first 64 KiB (header cut off or not a WAV)"
    fmt_size, fmt_off = chunks[b"fmt "]
    if fmt_size < 16 or fmt_off + 16 > len(head):
        return "the 'fmt ' chunk is too short"
    block_align = struct.unpack("<H", head[fmt_off + 12 : fmt_off + 14])[0]
    size, offset = chunks[b"data"]
    if not strict and (size == 0 or size >= _PLACEHOLDER_SIZE):
        return None
    if offset + size > file_size:
        frames = size // max(block_align, 1)
        held = (file_size - offset) // max(block_align, 1)
        return f"truncated: the header declares {frames} frames but the file holds {held}"
    if block_align and size % block_align:
        return f"the data size {size} is not a whole number of {block_align}-byte frames"
    return None


def is_valid_wav(path: str | Path) -> bool:
    """True if ``path`` is a readable, complete, non-empty WAV file.

    Complete means the data size declared in the header is present in full (so a file cut
    short by a crash or a kill is invalid), non-empty means at least one frame.
    """
    path = Path(path)
    try:
        if not path.is_file() or wav_header_problem(path, strict=True) is not None:
            return False
        info = sf.info(str(path))
    except (OSError, RuntimeError, sf.SoundFileError, struct.error):
        return False
    return info.format == "WAV" and info.frames > 0


def load_audio(path: str | Path, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to a 1-D float32 array at ``sampling_rate`` Hz, in [-1, 1].

    Multi-channel audio is downmixed by averaging the channels. Raises :class:`LorsError`
    naming the file when it is missing, cannot be decoded, is a truncated WAV or holds no
    samples.
    """
    path = Path(path)
    if not path.is_file():
        raise LorsError(f"audio file {path} does not exist; check the manifest or corpus path")
    try:
        problem = wav_header_problem(path, strict=False)
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, sf.SoundFileError, struct.error) as exc:
        hint = " (MP3 needs libsndfile >= 1.1)" if path.suffix.lower() == ".mp3" else ""
        raise LorsError(
            f"cannot decode audio file {path}{hint}: {exc}; re-create or re-download it"
        ) from exc
    if problem is not None:
        raise LorsError(f"audio file {path} is corrupt ({problem}); re-create or re-download it")
    if samples.shape[0] == 0:
        raise LorsError(f"audio file {path} holds no samples; re-create or re-download it")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate, sampling_rate)


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE,
              comment: str | None = None) -> None:
    """Write mono (1-D) or ``(frames, channels)`` float ``samples`` as 16-bit PCM WAV, atomically.

    Values are clipped to [-1, 1] first, because libsndfile would otherwise wrap overflowing
    samples around. The file appears under ``path`` only once it is complete. ``comment``
    (ASCII) is stored in a ``LIST/INFO`` chunk before the audio and read back with
    :func:`wav_comment`.
    """
    data = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    with atomic_file(Path(path), "wb") as handle:
        if comment is None:
            sf.write(handle, data, int(rate), subtype="PCM_16", format="WAV")
            return
        channels = 1 if data.ndim == 1 else data.shape[1]
        with sf.SoundFile(handle, "w", int(rate), channels, "PCM_16", format="WAV") as out:
            out.comment = comment  # set before any frame, so it precedes the data chunk
            out.write(data)


def wav_comment(path: str | Path) -> str | None:
    """The INFO comment :func:`write_wav` stored in ``path``, None if it has none or is
    unreadable."""
    try:
        with sf.SoundFile(str(path)) as handle:
            return handle.comment or None
    except (OSError, RuntimeError, sf.SoundFileError):
        return None


# --- degradation: all functions are pure given their random generator -------------------

NOISE_COLOURS = ("white", "pink", "brown")
_COLOUR_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # power spectrum ~ 1 / f**x
_COLOUR_FLOOR_HZ = 50.0  # coloured noise is flat below this: no inaudible sub-bass rumble
PEAK = 10 ** (-1 / 20)  # degraded speech is peak-normalised to -1 dBFS: never clips


def coloured_noise(length: int, colour: str, rng: np.random.Generator,
                   rate: int = SAMPLE_RATE) -> np.ndarray:
    """``length`` samples of zero-mean noise with unit RMS (float64).

    ``white`` is flat; ``pink`` (1/f) and ``brown`` (1/f^2) shape white Gaussian noise in the
    frequency domain, flat below 50 Hz and without a DC component.
    """
    if colour not in _COLOUR_EXPONENT:
        raise LorsError(f"unknown noise colour {colour!r}; choose from {', '.join(NOISE_COLOURS)}")
    noise = rng.standard_normal(length)
    exponent = _COLOUR_EXPONENT[colour]
    if exponent and length > 1:
        spectrum = np.fft.rfft(noise)
        freqs = np.maximum(np.fft.rfftfreq(length, 1.0 / rate), _COLOUR_FLOOR_HZ)
        spectrum *= freqs ** (-exponent / 2)
        spectrum[0] = 0.0
        noise = np.fft.irfft(spectrum, length)
    noise = noise - noise.mean()
    rms = np.sqrt(np.mean(noise ** 2)) if length else 0.0
    return noise / rms if rms > 0 else noise


def room_impulse_response(rt60: float, rng: np.random.Generator,
                          rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response with reverberation time ``rt60`` seconds (float64).

    A direct-path impulse followed by Gaussian noise under an exponential envelope whose
    energy falls by 60 dB after ``rt60`` seconds, where the response ends; the tail carries
    as much energy as the direct path, and the whole response has unit energy.
    """
    if not (rt60 > 0 and math.isfinite(rt60)):
        raise LorsError(f"RT60 must be a positive number of seconds, got {rt60!r}")
    length = max(2, int(round(rt60 * rate)))
    t = np.arange(length) / rate
    tail = rng.standard_normal(length) * 10 ** (-3 * t / rt60)  # amplitude: -60 dB at rt60
    tail[0] = 0.0
    tail *= 1.0 / np.sqrt(np.sum(tail ** 2))
    rir = tail
    rir[0] = 1.0
    return rir / np.sqrt(2.0)


def reverberate(samples: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``samples`` convolved with ``rir``: the full convolution, so the reverberant tail
    past the end of the dry signal is kept (``len(samples) + len(rir) - 1`` samples)."""
    return fftconvolve(np.asarray(samples, dtype=np.float64), rir, mode="full")


def add_noise(samples: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``samples`` plus ``noise`` scaled so that the mean power of ``samples`` over the mean
    power of the added noise, over the whole clip, is exactly ``snr_db`` decibels."""
    samples = np.asarray(samples, dtype=np.float64)
    if len(noise) != len(samples):
        raise ValueError("noise and samples differ in length")
    signal_power = np.mean(samples ** 2)
    noise_power = np.mean(np.asarray(noise, dtype=np.float64) ** 2)
    if signal_power == 0 or noise_power == 0:
        return samples.copy()
    gain = np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    return samples + gain * noise


def peak_normalise(samples: np.ndarray, peak: float = PEAK) -> np.ndarray:
    """``samples`` scaled so the largest magnitude is ``peak`` (silence stays silence)."""
    samples = np.asarray(samples, dtype=np.float64)
    top = np.max(np.abs(samples)) if samples.size else 0.0
    return samples * (peak / top) if top > 0 else samples.copy()
