"""Benchmark lors training against the default Hugging Face Seq2SeqTrainer recipe (30 s padding).

Same base (the embedded Whisper base unless --model), same data (espeak-ng speech of the
sentence bank, one language's train split), same batch size, learning rate and number of
optimizer steps. Each trainer runs in its own subprocess so that its peak RSS is its own:

* ``hf``: benchmarks/hf_baseline.py (features padded to 30 s);
* ``lors full``: ``lors.training.train`` in full mode (short encoder window);
* ``lors freeze-encoder``: encoder frozen, its outputs cached (the cache is built first and
  its time reported separately; a second run of any expert reuses it).

Throughput is samples per second from the median optimizer-step time (the first step, which
pays one-off allocation costs, is dropped), so a noisy neighbour during one step does not
decide the ratio. After training, every model (and the untrained base) is decoded on the dev
split with the same greedy settings, giving dev WER after the same number of samples. lors
selects its checkpoint on dev only at the last step here (--eval-every = steps), so both sides
are compared at the same point.

    python benchmarks/bench_train.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """Train one side and print one JSON line with its timings and peak RSS."""
    from lors.data.manifest import read_manifest
    utterances = read_manifest(args.manifest)
    if args.worker == "hf":
        sys.path.insert(0, str(HERE))
        from hf_baseline import run_hf_baseline
        train_utts = [u for u in utterances if u.language == args.language and u.split == "train"]
        result = run_hf_baseline(args.model, train_utts, args.language, args.task,
                                 steps=args.steps, batch_size=args.batch_size,
                                 learning_rate=args.lr, seed=0, out_dir=args.out)
        steps = result["step_seconds"]
    else:
        from lors.training import TrainConfig, train
        config = TrainConfig(base=args.model, manifest=args.manifest, out=args.out,
                             pairs=[(args.language, args.task)], mode=args.worker,
                             max_steps=args.steps, batch_size=args.batch_size,
                             learning_rate=args.lr, eval_every=args.steps, cpu=True,
                             cache_dir=args.cache, show_progress=False)
        train(config)
        log = [json.loads(l) for l in (Path(args.out) / "train_log.jsonl").read_text().splitlines()]
        steps = [r["step_seconds"] for r in log if "step_seconds" in r]
    median = statistics.median(steps[1:] if len(steps) > 1 else steps)
    print(json.dumps({"step_seconds": steps, "median_step_s": median,
                      "samples_per_second": args.batch_size / median,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_worker(kind: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--model", args.model,
               "--manifest", args.manifest, "--language", args.language, "--task", args.task,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--out", str(out), "--cache", str(args.cache)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["hf", "full", "freeze-encoder"])
    parser.add_argument("--model", default=None)
    parser.add_argument("--manifest", default=None)
    parser.add_argument("--language", default="de")
    parser.add_argument("--task", default="asr", choices=["asr", "st"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--skip-freeze", action="store_true")
    parser.add_argument("--eval-splits", default="dev",
                        help="splits to measure WER on after training, e.g. dev,test")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse models and timings already in --workdir (re-score only)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from lors.base import ensure_base_model
    from lors.data.synth import synthesize
    from lors.evaluation import evaluate
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lors-bench-train-"))
    args.model = args.model or str(ensure_base_model(show_progress=False))
    splits = sorted(set(["train", "dev"] + args.eval_splits.split(",")))
    args.manifest = args.manifest or str(synthesize([args.language], splits,
                                                    work / "speech", show_progress=False))
    args.cache = str(work / "cache")
    kinds = ["hf", "full"] + ([] if args.skip_freeze else ["freeze-encoder"])
    results, models = {}, {"base": args.model}
    for kind in kinds:
        out = work / f"model-{kind}"
        timing = work / f"timing-{kind}.json"
        if args.reuse and timing.is_file():
            results[kind] = json.loads(timing.read_text())
        else:
            results[kind] = run_worker(kind, args, out)
            timing.write_text(json.dumps(results[kind]))
        models[kind] = str(out)
        print(f"{kind:15s} median step {results[kind]['median_step_s']:.2f} s  "
              f"{results[kind]['samples_per_second']:.2f} samples/s  "
              f"peak RSS {results[kind]['peak_rss_mib']:.0f} MiB", flush=True)
    from lors.data.manifest import read_manifest
    clips = [u for u in read_manifest(args.manifest) if u.split in args.eval_splits.split(",")]
    metric = "WER %" if args.task == "asr" else "BLEU"
    print(f"\nsamples per run: {args.steps * args.batch_size} ({args.steps} steps x batch "
          f"{args.batch_size}, lr {args.lr:g}); {metric} on {args.eval_splits} "
          f"({len(clips)} clips) after training:")
    for name, path in models.items():
        row = evaluate(path, clips, languages=[args.language], tasks=[args.task])["results"][0]
        value = row["wer"] * 100 if args.task == "asr" else row["bleu"]
        print(f"  {name:15s} {value:.1f}", flush=True)
    hf = results["hf"]["samples_per_second"]
    for kind in kinds[1:]:
        print(f"ratio samples/s lors {kind} / HF Seq2SeqTrainer: "
              f"{results[kind]['samples_per_second'] / hf:.2f} (target >= 3)")
        print(f"ratio peak RSS lors {kind} / HF: "
              f"{results[kind]['peak_rss_mib'] / results['hf']['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
