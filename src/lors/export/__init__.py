"""Export a Whisper checkpoint for other runtimes: CTranslate2 (faster-whisper) or openai-whisper.

``export_model(model, out, "ct2" | "openai")`` takes anything ``open_checkpoint`` opens (a
Hugging Face folder, an openai ``.pt``, a hub id in the local cache, ``base``). The request
(format, quantization, the packages it needs, the output path) and what the target format
can hold are checked before any weight is read; the output is built in a temporary sibling
and put in place when complete, like every lors output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LorsError

FORMATS = ("ct2", "openai")
QUANTIZATIONS = ("float32", "float16", "bfloat16", "int8", "int8_float32", "int8_float16",
                 "int8_bfloat16", "int16")
"""CTranslate2 weight types (``int8_float16``: int8 weights, float16 for the rest)."""

_NEEDS = {
    "ct2": [("ctranslate2", "pip install ctranslate2 (or pip install 'lors[export]', which "
                            "also installs faster-whisper to run the result)")],
    "openai": [("whisper", "pip install --no-deps openai-whisper && pip install tiktoken "
                           "numba more-itertools (plain `pip install openai-whisper` also "
                           "pulls triton)")],
}


def _installed(package: str) -> bool:
    """Whether ``package`` is an installed package (a folder: graphite's unrelated ``whisper``
    is a single module), found without importing it."""
    spec = importlib.util.find_spec(package)
    return spec is not None and bool(spec.submodule_search_locations)


def check_request(fmt: str, quantization: str | None) -> None:
    """LorsError for an unknown format, an unknown quantization or one given for a format
    without quantization, and a missing package the format needs (saying what to install)."""
    if fmt not in FORMATS:
        raise LorsError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantization is not None and fmt != "ct2":
        raise LorsError(f"--quantization applies to --format ct2 only (openai-whisper "
                        f"checkpoints keep the stored dtype), got {quantization!r} for {fmt}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise LorsError(f"unknown quantization {quantization!r}; choose from "
                        f"{', '.join(QUANTIZATIONS)}")
    for module, install in _NEEDS[fmt]:
        if not _installed(module):
            raise LorsError(f"export format {fmt} needs the {module} package, which is not "
                            f"installed: {install}")


def check_destination(fmt: str, out: Path) -> None:
    """LorsError when ``out`` cannot hold ``fmt``: an openai checkpoint is a ``.pt`` file (the
    suffix by which lors and users recognise it)."""
    if fmt == "openai" and Path(out).suffix != ".pt":
        raise LorsError(f"--format openai writes one file; name it with .pt (got {out})")


def merge_export_path(merged: Path, fmt: str) -> Path:
    """Where ``lors merge --out DIR --export FMT`` writes the export: ``DIR-ct2/`` beside
    ``DIR`` for ct2, ``DIR.pt`` for openai."""
    merged = Path(merged)
    return merged.with_name(merged.name + ("-ct2" if fmt == "ct2" else ".pt"))


def plan_merge_exports(merged: Path, formats: list[str] | None, quantization: str | None,
                       force: bool, base=None, inputs: tuple = ()) -> list[tuple[str, Path]]:
    """``(format, path)`` of each export ``lors merge --out merged --export ...`` asked for,
    every one checked before the merge runs: format, quantization, packages, output path,
    tokenizer files (the merge copies the ``base``'s) and, for openai, that the base's
    architecture, which the merge keeps, fits openai's."""
    formats = list(dict.fromkeys(formats or []))
    if quantization is not None and "ct2" not in formats:
        raise LorsError("--quantization sets the weight type of --export ct2; add --export ct2")
    from ..fsutil import check_output_free
    planned = []
    for fmt in formats:
        check_request(fmt, quantization if fmt == "ct2" else None)
        path = merge_export_path(merged, fmt)
        check_output_free(path, force, inputs)
        planned.append((fmt, path))
    if planned:  # the merge keeps the base's architecture and side files
        from ..checkpoint.reader import open_checkpoint
        from .openai_pt import check_expressible
        from .source import side_files_folder
        checkpoint = open_checkpoint(base)
        side_files_folder(checkpoint)
        if "openai" in formats:
            check_expressible(checkpoint)
    return planned


def export_model(model, out: str | Path, fmt: str, *, quantization: str | None = None,
                 force: bool = False, inputs: tuple = ()) -> dict:
    """Write ``model`` in format ``fmt`` at ``out`` (a folder for ct2, a ``.pt`` file for
    openai); ``quantization`` (ct2 only) defaults to float32. ``inputs`` are further paths
    that ``--force`` must not replace. Returns a summary of what was written."""
    from ..checkpoint.reader import open_checkpoint
    from ..fsutil import atomic_directory, atomic_path, check_output_free

    check_request(fmt, quantization)
    out = Path(out)
    check_destination(fmt, out)
    check_output_free(out, force, inputs=[*([str(model)] if model is not None else []), *inputs])
    checkpoint = open_checkpoint(model)
    check_output_free(out, force, inputs=checkpoint.files)  # "base" or a hub id, resolved
    if fmt == "ct2":
        from .ct2 import write_ct2
        with atomic_directory(out, force=force) as folder:
            summary = write_ct2(checkpoint, folder, quantization or "float32")
    else:
        from .openai_pt import check_expressible, write_openai
        check_expressible(checkpoint)
        with atomic_path(out) as path:
            summary = write_openai(checkpoint, path)
    return {"source": checkpoint.source, "out": str(out), **summary}
