"""The main job ``python -m statespace demo``: options, data loading, and one tiny full run."""

import pathlib

import numpy as np
import pytest

from statespace import __main__ as cli
from statespace import _demo


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data", "--output", "--num-samples", "--num-warmup", "--num-steps",
                   "--forecast-years", "--last-weeks"):
        assert option in out
    with pytest.raises(SystemExit):
        cli.main([])  # a command is required


def test_bundled_data_loads_through_importlib_resources():
    times, y = _demo.load_co2()
    assert times.shape == (2284,) and y.shape == (2284, 1)
    assert int(np.isnan(y).sum()) == 59
    assert np.all(np.diff(times) > 0)
    assert 1958 < times[0] < 1959 and 2001 < times[-1] < 2002
    assert np.nanmin(y) > 300 and np.nanmax(y) < 400
    readme = pathlib.Path(_demo.__file__).parent / "data" / "README.md"
    assert "Keeling" in readme.read_text()


def test_build_model_structure():
    import jax.numpy as jnp

    params = {k: jnp.asarray(v) for k, v in _demo._START.items()}
    model = _demo.build_model(params, offset=350.0)
    assert model.state_dim == 6 and model.obs_dim == 1
    assert tuple(model.diffuse) == (True, True, False, False, False, False)
    np.testing.assert_allclose(model.d, [350.0])


@pytest.mark.slow  # 40 s, mostly compiling the 6-state model's fit, Hessian and NUTS
@pytest.mark.timeout(300)
def test_tiny_demo_run_on_a_subset(tmp_path, capsys):
    png = tmp_path / "demo.png"
    rc = cli.main(["demo", "--last-weeks", "104", "--num-steps", "8", "--num-warmup", "5",
                   "--num-samples", "5", "--forecast-years", "0.5", "--output", str(png),
                   "--no-progress", "--no-cache"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "std. error" in out and "log-likelihood" in out
    assert "r_hat" in out and "n_eff" in out
    for name in _demo.PARAMETERS:
        assert name in out
    pytest.importorskip("matplotlib")
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_custom_data_file_without_nuts_or_plot(tmp_path, capsys):
    times, y = _demo.load_co2()
    path = tmp_path / "co2.csv"
    rows = ["date,decimal_year,co2_ppm"]
    for t, v in zip(times[-60:], y[-60:, 0]):
        rows.append(f"x,{t:.6f},{'' if np.isnan(v) else v}")
    path.write_text("\n".join(rows) + "\n")
    rc = cli.main(["demo", "--data", str(path), "--num-steps", "3", "--num-samples", "0",
                   "--no-plot", "--no-progress", "--no-cache"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "60 weeks" in out and "NUTS" not in out
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="decimal_year"):
        _demo.load_co2(bad)
