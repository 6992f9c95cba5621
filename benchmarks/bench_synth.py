"""Benchmark espeak-ng synthesis throughput: utterances rendered per second.

Renders ``--sentences`` bank sentences of one split (train by default) in each of
``--languages`` into a temporary folder, from scratch, and prints utterances/s and the
ratio to the target of 20 utterances/s on 2 cores.

    python benchmarks/bench_synth.py --languages de,fr,es --sentences 20 --jobs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lors.data.manifest import read_manifest
from lors.data.synth import synthesize

TARGET_UTT_PER_S = 20.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--languages", default="de,fr,es")
    parser.add_argument("--split", default="train", help="bank split to draw sentences from")
    parser.add_argument("--sentences", type=int, default=20, help="sentences per language")
    parser.add_argument("--jobs", type=int, default=2, help="parallel espeak-ng processes")
    parser.add_argument("--bank-dir", default=None, help="sentence bank folder (default: built-in)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lors-bench-synth-") as tmp:
        start = time.perf_counter()
        manifest = synthesize(args.languages, [args.split], Path(tmp),
                              limit_per_split=args.sentences, jobs=args.jobs,
                              bank_dir=args.bank_dir, show_progress=False)
        elapsed = time.perf_counter() - start
        utterances = read_manifest(manifest)
    count = len(utterances)
    audio_s = sum(u.duration for u in utterances)
    rate = count / elapsed
    print(f"rendered {count} utterances ({audio_s:.1f} s of audio) in {elapsed:.2f} s "
          f"with {args.jobs} jobs")
    print(f"utterances/s: {rate:.1f}  (target {TARGET_UTT_PER_S:.0f}; "
          f"ratio {rate / TARGET_UTT_PER_S:.2f}x)  audio seconds per wall second: "
          f"{audio_s / elapsed:.1f}")
    return 0 if rate >= TARGET_UTT_PER_S else 1


if __name__ == "__main__":
    sys.exit(main())
