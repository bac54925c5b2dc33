"""Run every benchmark in one process: ``python -m benchmarks [--quick] [NAME ...]`` (``make bench``).

Each ``benchmarks/bench_*.py`` has a ``main(argv)`` that prints its side-by-side ratios; NAME picks
some of them (``forward``, ``generate``, ``store``, ...). ``--quick`` passes ``--quick`` on (a smoke
run with small shapes). Results are printed, not asserted: speed is reported as ratios measured in
one run against HF transformers, TransformerLens or a naive reference, never as timed tests.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path


def available() -> list[str]:
    """Return the benchmark names (``bench_forward.py`` -> ``forward``), sorted."""
    here = Path(__file__).parent
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(here)])
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"which to run (default: all of {names})")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"no benchmark named {unknown}; there are {names}")
    failed = []
    for name in args.names or names:
        print(f"\n=== benchmarks.bench_{name} {'--quick' if args.quick else ''}".rstrip(), flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.bench_{name}").main(["--quick"] if args.quick else [])
        except SystemExit as exc:  # a benchmark that cannot run here says why and exits
            if exc.code not in (0, None):
                print(f"bench_{name}: {exc.code}", file=sys.stderr)
                failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print(f"\nfailed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
