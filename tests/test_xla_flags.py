"""``enable_small_loop_compilation``: the flag it sets, what it leaves alone, and its effect on
the compiled gradient (each check in a fresh process: the flag is read at backend start-up)."""

import os

import pytest

import statespace
from tests.test_cache import run_python

pytestmark = pytest.mark.timeout(180)

# The adjoint gradient of a (4, 2) model: its loops (the filter storing its predictions, the
# backward adjoint step) touch more than jaxlib 0.10's default 1024 bytes per step.
PROGRAM = """
    import json, os
    import jax, jax.numpy as jnp, numpy as np
    import statespace
    added = {enable}
    jax.config.update("jax_enable_x64", True)
    from statespace import LinearGaussianSSM, log_likelihood
    rng = np.random.default_rng(0)
    n, m, T = 4, 2, 50
    model = LinearGaussianSSM(0.5 * np.eye(n) + 0.05 * rng.standard_normal((n, n)), np.eye(n),
                              rng.standard_normal((m, n)), np.eye(m), np.zeros(n), np.eye(n))
    y = jnp.asarray(rng.standard_normal((T, m)))
    grad = jax.jit(jax.grad(lambda mdl: log_likelihood(mdl, y)))
    text = grad.lower(model).compile().as_text()
    print("RESULT" + json.dumps({{"added": added, "flags": os.environ.get("XLA_FLAGS", ""),
                                 "loops": text.count(" while("),
                                 "single": text.count("xla_cpu_small_call")}}))
"""


def test_import_sets_no_flag(tmp_path):
    out = run_python(PROGRAM.format(enable="None"), tmp_path, XLA_FLAGS="")
    assert out["flags"] == ""


def test_flag_compiles_every_loop_of_the_gradient_into_one_function(tmp_path):
    out = run_python(PROGRAM.format(enable="statespace.enable_small_loop_compilation()"),
                     tmp_path, XLA_FLAGS="--xla_cpu_enable_fast_math=false")
    assert out["added"] is True
    assert out["flags"].startswith("--xla_cpu_enable_fast_math=false ")  # kept, then ours
    assert "xla_cpu_small_while_loop_byte_threshold=32768" in out["flags"]
    assert out["loops"] >= 2 and out["single"] == out["loops"]


def test_user_backend_options_win(tmp_path):
    user = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=64"
    out = run_python(PROGRAM.format(enable="statespace.enable_small_loop_compilation()"),
                     tmp_path, XLA_FLAGS=user)
    assert out["added"] is False and out["flags"] == user
    assert out["single"] < out["loops"]  # the user's tiny limit holds


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "1024"])
def test_bad_limit_raises(bad, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(ValueError, match="max_bytes"):
        statespace.enable_small_loop_compilation(bad)
    assert os.environ["XLA_FLAGS"] == ""
