"""Run the benchmarks and write ``benchmarks/RESULTS.md``.

``python -m benchmarks`` runs every area in turn (each in this one process, one after the
other, so nothing else competes for the cores), prints each area's table as it finishes,
and writes all tables with the machine's description to ``benchmarks/RESULTS.md``.
``python -m benchmarks lyap expm`` runs a subset, ``--quick`` at tiny sizes (a smoke test);
then the results go to ``--output`` only if given, so a partial run never replaces the full
``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import pathlib
import sys
import time
import traceback

import jax

from benchmarks._timing import machine_info

AREAS = ["lyap", "expm", "kron", "kalman", "continuous", "nonlinear", "gp", "parallel", "nuts",
         "compile"]
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


class _Tee(io.TextIOBase):
    """Write to the terminal and keep a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.stream.write(text)
        self.stream.flush()
        return self.copy.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("areas", nargs="*", default=AREAS, help=f"subset of {AREAS}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="results file")
    args = parser.parse_args(argv)
    unknown = [a for a in args.areas if a not in AREAS]
    if unknown:
        parser.error(f"unknown areas {unknown}; choose from {AREAS}")
    jax.config.update("jax_enable_x64", True)
    complete = not args.quick and set(args.areas) == set(AREAS)
    output = args.output or (RESULTS if complete else None)
    shown = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Benchmark results\n\n"
        f"Written by `{shown}` on {stamp}.\n\n"
        f"Machine: {machine_info()}.\n\n"
        "Every figure is a median of repeated jitted calls after a warm-up; each ratio "
        "compares two figures taken in the same run. Compare ratios, not absolute times, "
        "across machines. Compile times are trace + lower + XLA compile from cleared caches "
        "(`jax.jit(f).lower(*args).compile()`, no run included).\n"
    )
    sections = []
    failed = []
    for area in args.areas:
        print(f"\n## {area}\n", flush=True)
        tee = _Tee(sys.stdout)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(tee):
                importlib.import_module(f"benchmarks.{area}").main(["--quick"] if args.quick else [])
        except Exception:  # one broken area must not lose the others' tables
            failed.append(area)
            tee.write("\n**This area failed:**\n\n```\n" + traceback.format_exc() + "```\n")
        minutes = (time.perf_counter() - start) / 60
        sections.append(f"## {area}\n\n{tee.copy.getvalue().strip()}\n\n_({minutes:.1f} min)_\n")
        if output is not None:  # written after every area, so an interrupted run keeps its tables
            output.write_text(header + "\n" + "\n".join(sections))
    if output is not None:
        print(f"\nwrote {output}")
    else:
        print(f"\n{RESULTS.name} not written (a subset or --quick run); pass --output to keep the tables")
    if failed:
        print(f"failed areas: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
