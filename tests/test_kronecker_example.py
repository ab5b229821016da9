"""Smoke run of examples/kronecker_spatiotemporal.py at a tiny size."""

import importlib.util
import pathlib

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "kronecker_spatiotemporal.py"


def load():
    spec = importlib.util.spec_from_file_location("examples_kronecker_spatiotemporal", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Slow (quick-run time): rules.kron and product_of are tested in test_kron.py / test_models.py.
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kronecker_spatiotemporal_smoke():
    out = load().main(["--num-sites", "6", "--num-times", "25", "--num-steps", "60", "--no-progress",
                       "--no-cache"])
    # the Kronecker-eigenbasis likelihood and the per-mode Kalman filters are the same function
    assert out["agreement"]["log_likelihood"] < 1e-10
    assert out["agreement"]["gradient"] < 1e-7
    result = out["result"]
    assert np.isfinite(result.loss) and result.loss < result.losses[0]
    for name, estimate in out["estimates"].items():
        assert np.isfinite(estimate) and estimate > 0, name
        assert np.isfinite(out["standard_errors"][name]) and out["standard_errors"][name] > 0, name

