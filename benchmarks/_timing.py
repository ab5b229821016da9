"""Timing helpers shared by the benchmark scripts.

Every figure is a median over repeats of a jitted call. The compile time is measured apart:
``jax.jit(fn).lower(*args).compile()`` from cleared caches (:func:`compile_time`), so it is
the trace + lower + XLA compile a user waits for, never a cache hit and never mixed with a run;
the first call that follows is then a cache hit (its time, ``first_call_s``, is one run plus
dispatch). Ratios are only meaningful inside one run.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def compile_time(fn: Callable, *args) -> dict:
    """Trace + lower, then compile, ``fn`` for ``args``, each timed, from cleared caches.

    ``jax.clear_caches()`` first, so neither step is a cache hit (every other jitted function
    recompiles at its next call). Wall time and process CPU time (``time.process_time``: XLA's
    compile is mostly single-threaded, so on a shared machine its CPU time is steadier than
    its wall time). No persistent compilation cache is involved unless the caller set one up.

    Args:
        fn: a function of ``args`` (jitted or not; a jitted one keeps its static arguments).
        *args: example arguments (arrays or pytrees of arrays).

    Returns:
        ``{"lower_s", "lower_cpu_s", "compile_s", "compile_cpu_s", "hlo_chars", "compiled"}``:
        wall and CPU seconds of ``.lower(*args)`` (tracing to a jaxpr and lowering to
        StableHLO) and of ``.compile()``, the size of the lowered program's text, and the
        compiled executable.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    jax.clear_caches()
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = jitted.lower(*args)
    lower_s, lower_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return {"lower_s": lower_s, "lower_cpu_s": lower_cpu_s, "compile_s": compile_s,
            "compile_cpu_s": compile_cpu_s, "hlo_chars": len(lowered.as_text()),
            "compiled": compiled}


def _first_call(fn: Callable, args) -> tuple[float, float]:
    """``(compile_s, first_call_s)``: trace + lower + compile of a jitted ``fn`` (NaN for a
    plain Python callable, e.g. SciPy), then the time of the first call."""
    compile_s = math.nan
    if hasattr(fn, "lower"):
        timing = compile_time(fn, *args)
        compile_s = timing["lower_s"] + timing["compile_s"]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return compile_s, time.perf_counter() - start


def time_fn(fn: Callable, *args, repeats: int = 20, min_time: float = 0.2) -> dict:
    """Time ``fn(*args)``: compile (:func:`_first_call`), then the median of later calls.

    Args:
        fn: a callable, usually jitted; its outputs are blocked on.
        *args: its arguments.
        repeats: the minimum number of timed calls.
        min_time: keep calling until this many seconds have been spent (at most 10× repeats).

    Returns:
        ``{"compile_s", "first_call_s", "median_s", "min_s", "n"}``: ``compile_s`` is
        trace + lower + compile from cleared caches (NaN if ``fn`` is not jitted).
    """
    compile_s, first_call_s = _first_call(fn, args)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or (spent < min_time and len(times) < 10 * repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return {
        "compile_s": compile_s,
        "first_call_s": first_call_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "n": len(times),
    }


def time_interleaved(calls: dict, repeats: int = 20, min_time: float = 0.2, block: int = 4) -> dict:
    """Time several competitors in alternating blocks of calls: ``a a a a b b b b a a ...``.

    On a machine whose speed drifts (a shared VM: this one's medians moved 1.5-2× within
    minutes), timing one function after the other lets the drift land on one of them;
    alternating makes every competitor see the same conditions, so their ratios stay stable.
    Blocks, not single calls: right after another program ran, a call is slower (cold caches),
    so the first call of each block is a warm-up and is not counted. Alternate competitors of
    similar cost only: after the naive continuous-time gradient (30-150 ms a call) our 2-3 ms
    gradient stayed up to 1.5× slower for its whole block.

    Args:
        calls: ``{name: (fn, args)}``; each ``fn(*args)`` is blocked on.
        repeats: the minimum number of timed calls per competitor.
        min_time: keep going until this many seconds have been spent (at most 10× repeats).
        block: calls per competitor in a row (the first one not timed).

    Returns:
        ``{name: {"compile_s", "median_s", "min_s", "n", "block_medians"}}``: what
        :func:`time_fn` gives (no ``first_call_s``), and the median of each block in order (for
        :func:`paired_ratio`).
    """
    compile_s, times = {}, {name: [] for name in calls}
    blocks = {name: [] for name in calls}
    for name, (fn, args) in calls.items():
        compile_s[name] = _first_call(fn, args)[0]
    spent = 0.0
    while min(map(len, times.values())) < repeats or (
        spent < min_time and min(map(len, times.values())) < 10 * repeats
    ):
        for name, (fn, args) in calls.items():
            jax.block_until_ready(fn(*args))  # warm-up after the other competitors
            for _ in range(block - 1):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                spent += elapsed
            blocks[name].append(statistics.median(times[name][1 - block :]))
    return {
        name: {"compile_s": compile_s[name], "median_s": statistics.median(t), "min_s": min(t),
               "n": len(t), "block_medians": blocks[name]}
        for name, t in times.items()
    }


def paired_ratio(timings: dict, a: str, b: str) -> float:
    """Median over rounds of ``a``'s block median / ``b``'s next block median.

    From :func:`time_interleaved`. A burst of load that slows a few rounds moves the ratio of
    two overall medians (one competitor can collect more slowed calls than the other); a
    per-round ratio compares calls taken seconds apart, so it stays put.
    """
    pairs = zip(timings[a]["block_medians"], timings[b]["block_medians"])
    return statistics.median(x / y for x, y in pairs)


def format_seconds(seconds: float) -> str:
    """Human units: µs below 1 ms, ms below 1 s."""
    if seconds != seconds:  # NaN
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a markdown table (floats in seconds get human units when the
    column name ends in ``_s``; other floats are shown with 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(key, value):
        if isinstance(value, float):
            return format_seconds(value) if key.endswith("_s") else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k, "")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> str:
    """One line naming the CPU, core count, jax version and backend."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    x64 = jax.config.read("jax_enable_x64")
    return (
        f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"backend {jax.default_backend()}, x64={x64}"
    )
