"""The persistent compilation cache of the command line, and no JAX setting changed at import.

Each check runs in a fresh Python process: this one has imported statespace already, and
``tests/conftest.py`` has configured its own cache and float64.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import statespace
from statespace._cache import default_cache_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def run_python(code, tmp_path, **env_extra):
    """Run ``code`` in a fresh interpreter on this checkout, with no JAX cache configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HOME"] = str(tmp_path / "home")  # a stray default could only land in tmp_path
    env.pop("XDG_CACHE_HOME", None)
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_import_changes_no_jax_setting(tmp_path):
    out = run_python(
        """
        import json
        import jax
        before = {k: repr(v) for k, v in jax.config.values.items()}
        import rules, statespace, statespace.numpyro, statespace.models, statespace.testing
        after = {k: repr(v) for k, v in jax.config.values.items()}
        changed = sorted(k for k in before if before[k] != after.get(k))
        print("RESULT" + json.dumps({"changed": changed, "checked": len(before),
                                     "dir": jax.config.jax_compilation_cache_dir}))
        """,
        tmp_path,
    )
    # jax_enable_x64 and jax_compilation_cache_dir are among the settings compared
    assert out["changed"] == [] and out["checked"] > 50 and out["dir"] is None


# The demo's cache set-up runs before anything else; "--last-weeks 5" then stops the run
# (SystemExit) before any model is compiled, so this checks the set-up alone, in seconds.
CLI_SETUP = """
    import json
    import jax
    from statespace.__main__ import main
    try:
        main(["demo", "--last-weeks", "5", "--no-plot", "--no-progress"{extra}])
    except SystemExit as exc:
        assert "at least 10" in str(exc), exc
    folder = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # tiny program too
    jax.jit(lambda x: x * 2.0 + 1.0)(1.0).block_until_ready()
    print("RESULT" + json.dumps({{"folder": folder}}))
"""


def test_demo_cli_writes_compiled_programs_into_the_user_cache_dir(tmp_path):
    out = run_python(CLI_SETUP.format(extra=""), tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "statespace" / "jax"
    assert out["folder"] == str(folder)
    assert [p for p in folder.iterdir() if p.is_file()], "no cache entry written"


def test_demo_cli_no_cache_leaves_the_cache_off(tmp_path):
    out = run_python(CLI_SETUP.format(extra=', "--no-cache"'), tmp_path,
                     XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert out["folder"] is None
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_helper_with_a_path_and_the_default_folder(tmp_path, monkeypatch):
    out = run_python(
        f"""
        import json
        import jax
        import statespace
        folder = statespace.enable_compilation_cache({str(tmp_path / "given")!r},
                                                     min_compile_time_secs=0.0)
        jax.jit(lambda x: x @ x.T)(jax.numpy.ones((3, 2))).block_until_ready()
        print("RESULT" + json.dumps({{"folder": str(folder),
                                      "config": jax.config.jax_compilation_cache_dir}}))
        """,
        tmp_path,
    )
    given = tmp_path / "given"
    assert out == {"folder": str(given), "config": str(given)}
    assert [p for p in given.iterdir() if p.is_file()]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "statespace" / "jax"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "statespace" / "jax"
    with pytest.raises(ValueError, match="min_compile_time_secs"):
        statespace.enable_compilation_cache(tmp_path, min_compile_time_secs=-1.0)
