"""Run benchmark areas: ``python -m benchmarks [area ...] [--quick]``."""

from __future__ import annotations

import argparse
import importlib
import sys

AREAS = ["lyap", "expm", "kron", "kalman", "continuous"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("areas", nargs="*", default=AREAS, help=f"subset of {AREAS}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    args = parser.parse_args(argv)
    for area in args.areas:
        if area not in AREAS:
            parser.error(f"unknown area {area!r}; choose from {AREAS}")
        module = importlib.import_module(f"benchmarks.{area}")
        print(f"\n## {area}\n", flush=True)
        module.main(["--quick"] if args.quick else [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
