"""Benchmark lors evaluation speed against transformers' ASR pipeline, or the base's zero-shot WER.

Default mode: synthesise ``--sentences`` test sentences in each of ``--languages`` with
espeak-ng, then transcribe them with the embedded Whisper base three ways, all with the
language and task forced and the same ``--max-new-tokens``:

* ``lors evaluate``: batched, automatic short encoder window (the default),
* ``lors evaluate, 30 s window``: batched, full Whisper window,
* ``pipeline bs=1``: ``transformers.pipeline("automatic-speech-recognition")``, one clip
  at a time.

Each is warmed up on one clip first; timings cover audio loading, features and generation
(not model loading). Prints utterances/s, WER per language and the speed-up of
``lors evaluate`` over the pipeline (target >= 2x).

``--zero-shot``: the base's zero-shot ASR WER per language on the test split of all ten
languages (``--limit`` sentences each, 30 = the whole split), as a table.

    python benchmarks/bench_eval.py --languages de,fr,es --sentences 10 --threads 1
    python benchmarks/bench_eval.py --zero-shot --limit 30 --threads 1
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
from lors.data.audio import SAMPLE_RATE, load_audio
from lors.data.manifest import read_manifest
from lors.data.sentences import LANGUAGES
from lors.data.synth import synthesize
from lors.evaluation import evaluate, format_table, wer

TARGET_SPEEDUP = 2.0


def _data_dir(args: argparse.Namespace, stack: contextlib.ExitStack) -> Path:
    """``--data`` (kept, reused across runs) or a temporary folder removed at exit."""
    if args.data is not None:
        return Path(args.data)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lors-bench-eval-")))


def _run_lors(model_dir: str, manifest: Path, args, window: float | None) -> dict:
    """Evaluate once on the first clip (warm-up), then time the whole manifest."""
    kwargs = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  num_beams=args.num_beams, window_seconds=window)
    evaluate(model_dir, read_manifest(manifest)[:1], **kwargs)
    report = evaluate(model_dir, manifest, **kwargs)
    rows = report["results"]
    seconds = sum(r["seconds"] for r in rows)
    return {"n": sum(r["n"] for r in rows), "seconds": seconds,
            "wer": {r["language"]: r["wer"] for r in rows}}


def _run_pipeline(model_dir: str, manifest: Path, args) -> dict:
    """transformers' ASR pipeline, batch size 1, language/task/max_new_tokens/beams forced.

    The beam count is passed explicitly because the pipeline otherwise decodes with 5 beams
    (transformers 5 default) while ``evaluate`` defaults to greedy.
    """
    from transformers import pipeline

    pipe = pipeline("automatic-speech-recognition", model=model_dir, device="cpu",
                    dtype=torch.float32)
    utterances = read_manifest(manifest)

    def run(utt) -> str:
        kwargs = {"language": f"<|{utt.language}|>", "task": "transcribe",
                  "max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams}
        audio = {"raw": load_audio(utt.audio), "sampling_rate": SAMPLE_RATE}
        return pipe(audio, batch_size=1, generate_kwargs=kwargs)["text"].strip()

    run(utterances[0])  # warm-up
    start = time.perf_counter()
    hyps = [run(utt) for utt in utterances]
    seconds = time.perf_counter() - start
    languages = list(dict.fromkeys(u.language for u in utterances))
    scores = {}
    for language in languages:
        pairs = [(u.transcript, h) for u, h in zip(utterances, hyps) if u.language == language]
        scores[language] = wer([r for r, _ in pairs], [h for _, h in pairs], language)
    return {"n": len(utterances), "seconds": seconds, "wer": scores}


def _speed(args: argparse.Namespace, data: Path) -> int:
    manifest = synthesize(args.languages, ["test"], data, limit_per_split=args.sentences,
                          show_progress=False)
    model_dir = resolve_model_reference("base")
    runs = {"lors evaluate": _run_lors(model_dir, manifest, args, None),
            "lors evaluate, 30 s window": _run_lors(model_dir, manifest, args, 30.0),
            "pipeline bs=1": _run_pipeline(model_dir, manifest, args)}
    languages = list(runs["pipeline bs=1"]["wer"])
    print(f"{runs['pipeline bs=1']['n']} utterances ({', '.join(languages)}), "
          f"batch size {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"beams {args.num_beams}, "
          f"torch threads {torch.get_num_threads()}")
    width = max(map(len, runs))
    print(f"{'method'.ljust(width)}  utt/s  " + "  ".join(f"WER {l:>3}%" for l in languages))
    for name, run in runs.items():
        cells = "  ".join(f"{run['wer'][l] * 100:8.1f}" for l in languages)
        print(f"{name.ljust(width)}  {run['n'] / run['seconds']:5.2f}  {cells}")
    ratio = runs["pipeline bs=1"]["seconds"] / runs["lors evaluate"]["seconds"]
    window = runs["lors evaluate, 30 s window"]["seconds"] / runs["lors evaluate"]["seconds"]
    print(f"speed-up over pipeline: {ratio:.2f}x (target >= {TARGET_SPEEDUP:.0f}x: "
          f"{'ok' if ratio >= TARGET_SPEEDUP else 'SLOW'}); short window vs 30 s: {window:.2f}x")
    return 0 if ratio >= TARGET_SPEEDUP else 1


def _zero_shot(args: argparse.Namespace, data: Path) -> int:
    start = time.perf_counter()
    manifest = synthesize(args.languages, ["test"], data, limit_per_split=args.limit,
                          show_progress=False)
    synth_s = time.perf_counter() - start
    report = evaluate("base", manifest, tasks=args.tasks, batch_size=args.batch_size,
                      num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, out=args.out)
    print(format_table(report))
    asr = [r for r in report["results"] if r["task"] == "asr"]
    if asr:
        print(f"mean WER over {len(asr)} languages: "
              f"{sum(r['wer'] for r in asr) / len(asr) * 100:.1f} %")
    decode_s = sum(r["seconds"] for r in report["results"])
    print(f"synthesis {synth_s:.0f} s, decoding {decode_s:.0f} s, "
          f"total {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-shot", action="store_true",
                        help="print the base's zero-shot WER per language instead")
    parser.add_argument("--languages", default=None,
                        help="comma-separated (default: de,fr,es; all ten with --zero-shot)")
    parser.add_argument("--sentences", type=int, default=10, help="test sentences per language")
    parser.add_argument("--limit", type=int, default=30,
                        help="--zero-shot: test sentences per language (30 = all)")
    parser.add_argument("--tasks", default="asr", help="--zero-shot: asr, st or asr,st")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1, help="beams, for every method")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--data", default=None, help="keep synthetic audio here (reused)")
    parser.add_argument("--out", default=None, help="--zero-shot: write the JSON report here")
    args = parser.parse_args(argv)
    if args.languages is None:
        args.languages = ",".join(LANGUAGES) if args.zero_shot else "de,fr,es"
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        data = _data_dir(args, stack)
        return _zero_shot(args, data) if args.zero_shot else _speed(args, data)


if __name__ == "__main__":
    sys.exit(main())
