"""Measure how exported models transcribe compared with the Hugging Face model they came from.

Renders (or reuses, with ``--data``) the demo's espeak-ng test sentences in ``--languages``,
exports the embedded Whisper base to CTranslate2 float32 and ``--quantization`` (default
int8) and to an openai-whisper ``.pt``, and decodes every clip greedily with transformers,
faster-whisper and openai-whisper (30 s window, language and task forced, no timestamps,
temperature 0 without fallback; see :mod:`lors.export.check`), and once more with
faster-whisper's own padding (the clip's log-mel padded with zeros instead of the clip
padded with silence). Prints, per runtime, the clips whose transcript equals transformers'
exactly, the corpus WER against the references and its difference to transformers' WER,
and export and decoding times.

    python benchmarks/bench_export.py --languages de,es,fr --limit 10 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from lors.base import resolve_model_reference
from lors.data.audio import load_audio
from lors.data.manifest import read_manifest
from lors.data.synth import synthesize
from lors.evaluation import wer
from lors.evaluation.normalize import normalize
from lors.export import export_model
from lors.export.check import Clip, faster_whisper_greedy, hf_greedy, openai_greedy


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - started


def _clips(args, folder: Path) -> tuple[list[Clip], list[str]]:
    manifest = synthesize(args.languages, ["test"], folder, limit_per_split=args.limit,
                          show_progress=False)
    utterances = read_manifest(manifest)
    return ([Clip(load_audio(u.audio), u.language) for u in utterances],
            [u.transcript for u in utterances])


def _row(name: str, texts: list[str], reference: list[str], truth: list[str], clips, seconds):
    same = sum(a == b for a, b in zip(texts, reference))
    error = 100 * wer([normalize(t, c.language) for t, c in zip(truth, clips)],
                      [normalize(h, c.language) for h, c in zip(texts, clips)])
    return name, same, error, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--languages", default="de,es,fr")
    parser.add_argument("--limit", type=int, default=10, help="test sentences per language")
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--data", help="folder for the rendered speech (kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--show", action="store_true", help="print transcripts that differ")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = resolve_model_reference("base")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lors-bench-export-")))
        clips, truth = _clips(args, Path(args.data) if args.data else work / "speech")
        exports = {}
        for name, fmt, quantization, out in (
                ("ct2 float32", "ct2", "float32", work / "f32"),
                (f"ct2 {args.quantization}", "ct2", args.quantization, work / "quantized"),
                ("openai", "openai", None, work / "model.pt")):
            _, seconds = _timed(export_model, base, out, fmt, quantization=quantization)
            exports[name] = (out, seconds)
            print(f"export {name}: {seconds:.1f} s", flush=True)
        reference, hf_seconds = _timed(hf_greedy, base, clips)
        rows = [_row("transformers", reference, reference, truth, clips, hf_seconds)]
        runs = [(name, out, True) for name, (out, _) in exports.items()]
        runs.append(("ct2 float32, own padding", exports["ct2 float32"][0], False))
        for name, out, pad_audio in runs:
            if name == "openai":
                texts, seconds = _timed(openai_greedy, out, clips)
            else:
                texts, seconds = _timed(faster_whisper_greedy, out, clips, pad_audio=pad_audio,
                                        compute_type=name.split()[1].rstrip(","))
            rows.append(_row(f"{'openai-whisper' if name == 'openai' else 'faster-whisper'} "
                             f"({name})", texts, reference, truth, clips, seconds))
            for text, hf_text in zip(texts, reference):
                if text != hf_text and args.show:
                    print(f"  {name}: {text!r} vs transformers {hf_text!r}")
    hf_wer = rows[0][2]
    print(f"\n{len(clips)} clips ({args.languages}, {args.limit} test sentences each)")
    print(f"{'runtime':<48}{'same as HF':>11}{'WER %':>8}{'dWER':>8}{'decode s':>10}")
    for name, same, error, seconds in rows:
        print(f"{name:<48}{same:>6}/{len(clips):<4}{error:>8.2f}{error - hf_wer:>+8.2f}"
              f"{seconds:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
