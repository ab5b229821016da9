"""JAX's persistent compilation cache for command-line runs (``statespace demo``, the examples).

A user's first run of a script is mostly XLA compilation (the demo spends ~80 % of its time
compiling). JAX can keep compiled programs on disk, keyed by the program, JAX's version, the
backend and the XLA flags, so a second run of the same script loads them instead of compiling
again: nothing stale can be read.

This is a process-wide JAX setting, so the library never turns it on by itself (importing
``statespace`` changes no ``jax.config`` value): the command line and the example scripts call
:func:`enable_compilation_cache` at start-up, and users' own scripts may do the same.
"""

from __future__ import annotations

import os
import pathlib

import jax

__all__ = ["default_cache_dir", "enable_compilation_cache"]

#: programs that compile faster than this are not written (a file read costs milliseconds,
#: and the demo's many small programs would only crowd the folder)
_MIN_COMPILE_TIME_SECS = 0.2


def default_cache_dir() -> pathlib.Path:
    """The user's cache folder for statespace's compiled programs.

    Returns:
        ``$XDG_CACHE_HOME/statespace/jax`` when ``XDG_CACHE_HOME`` is set (and not empty),
        else ``~/.cache/statespace/jax``. The folder is not created here.

    Example:
        >>> import os
        >>> from unittest import mock
        >>> from statespace._cache import default_cache_dir
        >>> with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": "/scratch/cache"}):
        ...     default_cache_dir().as_posix()
        '/scratch/cache/statespace/jax'
        >>> default_cache_dir().parts[-2:]
        ('statespace', 'jax')
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "statespace" / "jax"


def enable_compilation_cache(path=None, *, min_compile_time_secs=_MIN_COMPILE_TIME_SECS):
    """Turn on JAX's persistent compilation cache for this process.

    Sets ``jax_compilation_cache_dir`` and ``jax_persistent_cache_min_compile_time_secs``: a
    process-wide setting, meant for a script's start-up (the command line and the examples
    call it; the library never does). Call it before the first compilation: JAX opens the
    cache folder once, at the first compilation that could use it, and keeps it for the
    process. Entries are keyed by the program, JAX's version and the XLA flags, so an
    upgrade just starts new entries; delete the folder to reclaim the space.

    Args:
        path: the folder (created if missing). Default: the folder JAX is already configured
            with (``jax_compilation_cache_dir``, e.g. from ``JAX_COMPILATION_CACHE_DIR``) if
            any, else :func:`default_cache_dir`.
        min_compile_time_secs: only programs that took at least this long to compile are
            written (JAX's own default is 1 s).

    Returns:
        The cache folder as a ``pathlib.Path``.

    Raises:
        ValueError: ``min_compile_time_secs`` is negative.
        OSError: the folder cannot be created.

    Example:
        At a script's start-up:

        >>> import statespace
        >>> statespace.enable_compilation_cache()  # doctest: +SKIP
        PosixPath('/home/me/.cache/statespace/jax')

        The settings it makes, undone at the end (a process-wide change):

        >>> import jax, pathlib, tempfile
        >>> before = (jax.config.jax_compilation_cache_dir,
        ...           jax.config.jax_persistent_cache_min_compile_time_secs)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = statespace.enable_compilation_cache(pathlib.Path(tmp) / "jax",
        ...                                                   min_compile_time_secs=0.5)
        ...     print(folder.is_dir(), jax.config.jax_compilation_cache_dir == str(folder),
        ...           jax.config.jax_persistent_cache_min_compile_time_secs)
        True True 0.5
        >>> jax.config.update("jax_compilation_cache_dir", before[0])
        >>> jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    """
    if min_compile_time_secs < 0:
        raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs}")
    if path is None:
        path = jax.config.jax_compilation_cache_dir or default_cache_dir()
    folder = pathlib.Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return folder
