"""Command line: ``python -m statespace demo`` (also the console script ``statespace``)."""

from __future__ import annotations

import argparse
import sys

from statespace import _demo


def build_parser() -> argparse.ArgumentParser:
    """The ``statespace`` argument parser (one sub-command per job).

    Example:
        >>> from statespace.__main__ import build_parser
        >>> parser = build_parser()
        >>> parser.prog
        'statespace'
        >>> args = parser.parse_args(["demo", "--num-samples", "0", "--no-plot"])
        >>> args.command, args.num_samples, args.no_plot
        ('demo', 0, True)
    """
    parser = argparse.ArgumentParser(
        prog="statespace",
        description="Continuous- and discrete-time linear-Gaussian state-space models in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="fit a continuous-time model to the weekly Mauna Loa CO2 series "
             "(maximum likelihood, NUTS, forecast figure)",
        description=_demo.__doc__.split("\n\n")[0] + " Fits trend + yearly quasi-periodic "
        "component + noise by maximum likelihood (with standard errors), runs a short NUTS "
        "chain, and writes a PNG of the data, smoothed mean, 95% band and a forecast.",
    )
    _demo.add_arguments(demo)
    return parser


def main(argv=None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status.

    Example:
        >>> # the demo checks its arguments before fitting anything (a complete run compiles
        >>> # for tens of seconds: tests/test_demo.py runs those)
        >>> from statespace.__main__ import main
        >>> main(["demo", "--last-weeks", "5", "--no-cache", "--no-plot", "--no-progress"])
        Traceback (most recent call last):
            ...
        SystemExit: --last-weeks must be at least 10
    """
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo.run(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
