"""XLA:CPU's small-loop compilation for command-line runs (``statespace demo``, the examples).

XLA:CPU (jaxlib's thunk runtime) runs a program as a sequence of operations, each dispatched
by the runtime; a ``while`` loop (``lax.scan``) whose one iteration touches few bytes is
instead compiled into a single function, with no dispatch per operation per step. The size
limit is the backend option ``xla_cpu_small_while_loop_byte_threshold``: 1024 bytes in
jaxlib 0.10 (Python 3.11), where a Kalman step of a 4-state model is already above it, and
far more in jaxlib 0.12 (Python 3.12+), which compiles the filters' loops of 4- and 8-state
models into single functions by default.

The limit is read from the ``XLA_FLAGS`` environment variable when JAX starts its CPU
backend (at the first computation), once per process, so it is a process-wide setting: the
library never sets it (importing ``statespace`` changes nothing), the command line and the
example scripts call :func:`enable_small_loop_compilation` at start-up, and users' own
scripts may do the same. Measured on jaxlib 0.10 (2-core CPU, float64): the continuous-time
(4, 2, 1000) gradient 5.2 -> 1.6 ms, its compile unchanged (``python -m benchmarks.continuous``
with and without the flag).
"""

from __future__ import annotations

import os

__all__ = ["enable_small_loop_compilation"]

_OPTION = "xla_cpu_small_while_loop_byte_threshold"
#: the loops of the filters of models up to ~8 states (jaxlib 0.12 compiles those too)
_DEFAULT_BYTES = 32768


def enable_small_loop_compilation(max_bytes=_DEFAULT_BYTES):
    """Let XLA:CPU compile loops whose step touches up to ``max_bytes`` into single functions.

    Appends ``--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=max_bytes``
    to the ``XLA_FLAGS`` environment variable. A process-wide setting, read when JAX starts its
    CPU backend: call it at a script's start-up, before the first JAX computation (later calls
    change nothing in this process). ``XLA_FLAGS`` that already hold
    ``--xla_backend_extra_options`` are left as they are (the option takes one list, and the
    user's wins).

    Args:
        max_bytes: the largest number of bytes one loop iteration may touch (a positive
            integer).

    Returns:
        True when the flag was added, False when ``XLA_FLAGS`` already set backend options.

    Raises:
        ValueError: ``max_bytes`` is not a positive integer.

    Example:
        At a script's start-up, before JAX computes anything:

        >>> import statespace
        >>> statespace.enable_small_loop_compilation()  # doctest: +SKIP
        True

        What it does to ``XLA_FLAGS`` (here in a copy of the environment that is restored):

        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}):
        ...     print(statespace.enable_small_loop_compilation(4096), os.environ["XLA_FLAGS"])
        True --xla_cpu_enable_fast_math=false
        --xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096
        >>> with mock.patch.dict(os.environ, {"XLA_FLAGS": "--xla_backend_extra_options=a=1"}):
        ...     print(statespace.enable_small_loop_compilation(), os.environ["XLA_FLAGS"])
        False --xla_backend_extra_options=a=1
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_extra_options" in flags:
        return False
    option = f"--xla_backend_extra_options={_OPTION}={max_bytes}"
    os.environ["XLA_FLAGS"] = f"{flags} {option}".strip()
    return True
