"""Build (and optionally execute) ``examples/gradient_accuracy.ipynb``.

The notebook's cells live here as plain strings so that they can be reviewed and diffed as
code; ``python examples/_make_gradient_accuracy_notebook.py --execute`` writes the notebook
next to this file and runs it in place with nbclient, so the committed notebook carries its
outputs. ``--script PATH`` writes the code cells as one Python file instead (for debugging).
"""

from __future__ import annotations

import argparse
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOK = HERE / "gradient_accuracy.ipynb"

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
    CELLS.append(("markdown", text.strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", text.strip("\n")))


md(r"""
# How accurate are the derivatives?

This notebook measures, rather than asserts, how close the derivatives of `rules.lyap`,
`rules.dlyap`, `rules.expm`, `statespace.discretize` and a full continuous-time Kalman
log-likelihood are to the truth, and how that compares with what plain JAX gives:

* **ours**: forward mode (`jax.jvp`) and reverse mode (`jax.vjp`) through the package's rules;
* **plain JAX**: autodiff through `jax.scipy.linalg.expm`, through the dense Kronecker
  Lyapunov solve `jnp.linalg.solve(kron(I, A) + kron(A, I), -vec Q)`, and through Van Loan's
  block exponential for the discretisation;
* **finite differences**: plain float64 central differences of our own primal, step
  `h = ε^{1/3} max(1, ‖x‖∞)` (the textbook optimum).

**The truth** is a directional derivative computed with [mpmath](https://mpmath.org) at 40
significant digits: a central difference of an independent mpmath implementation of each
function (dense Kronecker solves, `mpmath.expm`, an mpmath Kalman filter) with step
`h = 1e-15`. Its truncation error `O(h²) ≈ 1e-30` and rounding error `≈ 1e-40 κ / h` sit
many orders below float64 resolution, so every error below is the float64 method's own.

Each panel sweeps one difficulty (conditioning, `‖A‖`, the step `dt`) on log–log axes and
plots the relative error `‖D − D_ref‖ / ‖D_ref‖` of the directional derivative `D` along a
random unit direction. Reverse mode is checked through the duality `⟨ū, J v⟩ = ⟨Jᵀ ū, v⟩`
with a random output cotangent `ū`. Sizes are kept tiny (n ≤ 4) so the notebook runs in
about a minute; it is executed by the test suite (`tests/test_notebook.py`).
""")

code(r"""
import functools
import json
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm in a bare kernel

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import mpmath
import numpy as np

jax.config.update("jax_enable_x64", True)

import rules
import statespace
from statespace.testing import check_derivatives

DPS = 40            # mpmath working precision (decimal digits)
MP_STEP = "1e-15"   # central-difference step of the high-precision reference
EPS = np.finfo(np.float64).eps
rng = np.random.default_rng(20241125)
started = time.perf_counter()
%matplotlib inline
""")

md(r"""
## Tools

`mp_directional` is the reference: it perturbs the inputs along `v` by `±h` in mpmath and
differences the outputs *in mpmath* before rounding to float64. `fd_directional` is the
float64 central difference a user would write. `errors_along` evaluates all of them for one
random direction and returns the relative errors.
""")

code(r"""
def to_mp(x):
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in x])


def mp_to_np(M):
    if isinstance(M, mpmath.matrix):
        return np.array([[float(M[i, j]) for j in range(M.cols)] for i in range(M.rows)])
    return np.array(float(M))


def mp_directional(f_mp, xs, vs):
    # (f(x + h v) - f(x - h v)) / 2h, all in mpmath; f_mp returns a tuple of mp matrices/scalars
    with mpmath.workdps(DPS):
        h = mpmath.mpf(MP_STEP)
        plus = f_mp(*[to_mp(x) + h * to_mp(v) for x, v in zip(xs, vs)])
        minus = f_mp(*[to_mp(x) - h * to_mp(v) for x, v in zip(xs, vs)])
        return tuple(mp_to_np((p - m) / (2 * h)) for p, m in zip(plus, minus))


def fd_directional(f, xs, vs):
    h = EPS ** (1 / 3) * max(1.0, max(float(np.max(np.abs(x))) for x in xs))
    plus = f(*[x + h * v for x, v in zip(xs, vs)])
    minus = f(*[x - h * v for x, v in zip(xs, vs)])
    return tuple((np.asarray(p) - np.asarray(m)) / (2 * h) for p, m in zip(plus, minus))


def rel_err(value, ref):
    value = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in value])
    ref = np.concatenate([np.ravel(np.asarray(r, np.float64)) for r in ref])
    err = np.linalg.norm(value - ref) / np.linalg.norm(ref)
    return float(err) if np.isfinite(err) else np.inf


@functools.lru_cache(maxsize=None)
def compiled(f):
    # jitted value, JVP and VJP of f(*xs, *extra), differentiated in xs only: compiled once per
    # function and shape, whatever the point of the sweep (passed as arguments, not closed over)
    def jvp(xs, vs, extra):
        return jax.jvp(lambda *x: f(*x, *extra), tuple(xs), tuple(vs))

    def vjp(xs, u, extra):
        return jax.vjp(lambda *x: f(*x, *extra), *xs)[1](u)

    return jax.jit(f), jax.jit(jvp), jax.jit(vjp)


def errors_along(ours, plain, f_mp, xs, vs, extra=()):
    # ours/plain: JAX functions f(*xs, *extra) returning a tuple of arrays; f_mp: mpmath f(*xs)
    xs = [np.asarray(x, np.float64) for x in xs]
    vs = [np.asarray(v, np.float64) for v in vs]
    extra = tuple(jnp.asarray(e) for e in extra)
    ref = mp_directional(f_mp, xs, vs)
    jx, jv = tuple(jnp.asarray(x) for x in xs), tuple(jnp.asarray(v) for v in vs)
    value_ours, jvp_ours, vjp_ours = compiled(ours)
    out, tangent_ours = jvp_ours(jx, jv, extra)
    _, tangent_plain = compiled(plain)[1](jx, jv, extra)
    # reverse mode via duality: <Jᵀ u, v> against <u, J v>
    u = tuple(rng.standard_normal(np.shape(o)) for o in out)
    pulled = vjp_ours(jx, tuple(jnp.asarray(c) for c in u), extra)
    lhs = sum(float(np.sum(np.asarray(p) * v)) for p, v in zip(pulled, vs))
    rhs = sum(float(np.sum(c * r)) for c, r in zip(u, ref))
    scale = np.sqrt(sum(np.sum(c**2) for c in u)) * np.sqrt(sum(np.sum(r**2) for r in ref))
    fd = fd_directional(lambda *x: value_ours(*x, *extra), xs, vs)
    return {
        "ours (jvp)": rel_err(tangent_ours, ref),
        "ours (vjp)": abs(lhs - rhs) / scale,
        "plain JAX": rel_err(tangent_plain, ref),
        "finite differences": rel_err(fd, ref),
    }


def unit(shape):
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v)


def sym_unit(n):
    v = rng.standard_normal((n, n))
    v = v + v.T
    return v / np.linalg.norm(v)


STYLE = {
    "ours (jvp)": dict(marker="o", color="C0"),
    "ours (vjp)": dict(marker="+", color="C0", linestyle="none", markersize=10),
    "plain JAX": dict(marker="s", color="C3"),
    "finite differences": dict(marker="^", color="C7", linestyle="--"),
}
FLOOR, CEIL = 1e-17, 10.0   # errors are clipped into this band for plotting (∞ -> top edge)


def plot_sweep(ax, x, rows, xlabel, title, reference_slope=None):
    for name, style in STYLE.items():
        y = np.clip([r[name] for r in rows], FLOOR, CEIL)
        ax.loglog(x, y, label=name, **style)
    if reference_slope is not None:
        ax.loglog(x, reference_slope, ":", color="k", label=reference_slope_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("relative error")
    ax.set_title(title)
    ax.set_ylim(FLOOR, CEIL)
    ax.grid(True, which="major", alpha=0.3)


def table(x, rows, xname):
    names = list(STYLE)
    print(f"{xname:>12} " + " ".join(f"{n:>19}" for n in names))
    for xi, r in zip(x, rows):
        print(f"{xi:12.3g} " + " ".join(f"{r[n]:19.2e}" for n in names))


summary = {}
reference_slope_label = "κ · ε"
""")

md(r"""
## 1. `rules.lyap`: `A X + X Aᵀ + Q = 0` against the conditioning of the operator

`A = V diag(−δ, −1, −2, −3) V⁻¹` with a fixed random, moderately non-normal `V`; as `δ → 0`
one eigenvalue approaches the imaginary axis and the Lyapunov operator `X ↦ A X + X Aᵀ`
(= `I ⊗ A + A ⊗ I`) becomes ill-conditioned. The x axis is its 2-norm condition number `κ`.
The direction perturbs `A` and `Q` together. The mpmath reference solves the 16 × 16
Kronecker system at 40 digits.
""")

code(r"""
n = 4
V = np.eye(n) + 0.3 * rng.standard_normal((n, n))
B = rng.standard_normal((n, n))
Q_lyap = B @ B.T + np.eye(n)


def mp_lyap(A, Q):
    n = A.rows
    K = mpmath.matrix(n * n, n * n)
    for i in range(n):
        for j in range(n):
            for k in range(n):
                # row-major vec: (A X)[i, j] = A[i, k] X[k, j]; (X Aᵀ)[i, j] = X[i, k] A[j, k]
                K[i * n + j, k * n + j] += A[i, k]
                K[i * n + j, i * n + k] += A[j, k]
    x = mpmath.lu_solve(K, -mpmath.matrix([Q[i, j] for i in range(n) for j in range(n)]))
    return mpmath.matrix([[x[i * n + j] for j in range(n)] for i in range(n)])


def plain_lyap(A, Q):
    n = A.shape[0]
    eye = jnp.eye(n)
    K = jnp.kron(eye, A) + jnp.kron(A, eye)   # row-major vec
    return jnp.linalg.solve(K, -Q.ravel()).reshape(n, n)


ours_lyap = lambda A, Q: (rules.lyap(A, Q),)              # noqa: E731
plain_lyap_tuple = lambda A, Q: (plain_lyap(A, Q),)       # noqa: E731
lyap_x, lyap_rows = [], []
for delta in np.logspace(0, -6, 7):
    A = V @ np.diag([-delta, -1.0, -2.0, -3.0]) @ np.linalg.inv(V)
    kappa = np.linalg.cond(np.kron(np.eye(n), A) + np.kron(A, np.eye(n)))
    lyap_x.append(kappa)
    lyap_rows.append(errors_along(
        ours_lyap, plain_lyap_tuple, lambda A, Q: (mp_lyap(A, Q),), [A, Q_lyap], [unit((n, n)), sym_unit(n)]))
table(lyap_x, lyap_rows, "kappa")
""")

md(r"""
## 2. `rules.dlyap`: `A X Aᵀ − X + Q = 0` as the spectral radius approaches 1

`A = V diag(ρ, 0.5, −0.4, 0.2) V⁻¹` with `ρ = 1 − 10^{−k}`; the operator `I − A ⊗ A` has
condition number growing like `1 / (1 − ρ²)`. Plain JAX is the dense solve
`jnp.linalg.solve(I − kron(A, A), vec Q)`.
""")

code(r"""
def mp_dlyap(A, Q):
    n = A.rows
    K = mpmath.eye(n * n)
    for i in range(n):
        for j in range(n):
            for k in range(n):
                for l in range(n):
                    K[i * n + j, k * n + l] -= A[i, k] * A[j, l]   # (A X Aᵀ)[i, j]
    x = mpmath.lu_solve(K, mpmath.matrix([Q[i, j] for i in range(n) for j in range(n)]))
    return mpmath.matrix([[x[i * n + j] for j in range(n)] for i in range(n)])


def plain_dlyap(A, Q):
    n = A.shape[0]
    return jnp.linalg.solve(jnp.eye(n * n) - jnp.kron(A, A), Q.ravel()).reshape(n, n)


ours_dlyap = lambda A, Q: (rules.dlyap(A, Q),)            # noqa: E731
plain_dlyap_tuple = lambda A, Q: (plain_dlyap(A, Q),)     # noqa: E731
dlyap_x, dlyap_rows = [], []
for k in np.linspace(0.5, 6, 7):
    rho = 1 - 10.0 ** (-k)
    A = V @ np.diag([rho, 0.5, -0.4, 0.2]) @ np.linalg.inv(V)
    dlyap_x.append(np.linalg.cond(np.eye(n * n) - np.kron(A, A)))
    dlyap_rows.append(errors_along(
        ours_dlyap, plain_dlyap_tuple, lambda A, Q: (mp_dlyap(A, Q),), [A, Q_lyap], [unit((n, n)), sym_unit(n)]))
table(dlyap_x, dlyap_rows, "kappa")
""")

md(r"""
## 3. `rules.expm` against `‖A‖₁`

`A = t A₀ / ‖A₀‖₁` for a fixed random, non-normal, stable `A₀` (n = 4) and `‖A‖₁ = t` from
1e-2 to 1e3, so the scaling-and-squaring algorithms go from no squaring to about ten. The
derivative is the Fréchet derivative `L(A, E)` along a random unit `E`. Plain JAX is
`jax.jvp(jax.scipy.linalg.expm)` (autodiff through its Padé branches and squarings); the
reference is `mpmath.expm` at 40 digits.
""")

code(r"""
A0 = 0.5 * rng.standard_normal((n, n)) - 1.5 * np.eye(n)
A0 = A0 / np.abs(A0).sum(axis=0).max()

ours_expm = lambda A: (rules.expm(A),)                    # noqa: E731
plain_expm = lambda A: (jax.scipy.linalg.expm(A),)        # noqa: E731
expm_x, expm_rows = [], []
for t in np.logspace(-2, 3, 8):
    expm_x.append(t)
    expm_rows.append(errors_along(
        ours_expm, plain_expm, lambda A: (mpmath.expm(A),), [t * A0], [unit((n, n))]))
table(expm_x, expm_rows, "||A||_1")
""")

md(r"""
## 4. `statespace.discretize` against the step `dt`

`F = e^{A dt}`, `Qd = ∫₀^dt e^{As} Q e^{Aᵀs} ds` for a fixed stable, non-normal `A` (n = 3,
`‖A‖₂ ≈ 2`) and `dt` from 1e-6 to 1e2; the direction perturbs `A` and `Q` together and the
error is that of the stacked pair `(Ḟ, Q̇d)`. Plain JAX is Van Loan's block exponential
`expm([[−A, Q], [0, Aᵀ]] dt)` through `jax.scipy.linalg.expm` (`F = M₂₂ᵀ`, `Qd = F M₁₂`).
The mpmath reference uses `F = mpmath.expm(A dt)` and the exact identity
`A Qd + Qd Aᵀ = F Q Fᵀ − Q`, solved at 40 digits.
""")

code(r"""
nd = 3
Vd = np.eye(nd) + 0.4 * rng.standard_normal((nd, nd))
A_disc = Vd @ np.diag([-0.3, -1.0, -2.0]) @ np.linalg.inv(Vd)
Bd = rng.standard_normal((nd, nd))
Q_disc = Bd @ Bd.T + 0.5 * np.eye(nd)
H_dummy, R_dummy = jnp.eye(nd)[:1], jnp.eye(1)


def ours_disc(A, Q, dt):
    F, Qd, _ = statespace.discretize(statespace.ContinuousLinearSSM(A, Q, H_dummy, R_dummy), dt)
    return F, Qd


def van_loan(A, Q, dt):
    m = A.shape[0]
    M = jnp.block([[-A, Q], [jnp.zeros_like(A), A.T]]) * dt
    E = jax.scipy.linalg.expm(M)
    F = E[m:, m:].T
    return F, F @ E[:m, m:]


def mp_disc(dt):
    def f(A, Q):
        F = mpmath.expm(A * mpmath.mpf(dt))
        return F, mp_lyap(A, Q - F * Q * F.T)
    return f


disc_x, disc_rows = [], []
for dt in np.logspace(-6, 2, 8):
    disc_x.append(dt)
    disc_rows.append(errors_along(ours_disc, van_loan, mp_disc(dt), [A_disc, Q_disc],
                                  [unit((nd, nd)), sym_unit(nd)], extra=(dt,)))
table(disc_x, disc_rows, "dt")
""")

md(r"""
## 5. A full continuous-time log-likelihood against the time scale of the data

A two-state model `dx = A x dt + dW` (stable, non-normal `A` with eigenvalues −0.2 and −1.5,
full `Q`), observed through
`H = [1, 0]` with noise variance `R` at 16 irregular times `t_k = s · τ_k`, started from the
stationary covariance `P∞ = lyap(A, Q)`. The scale `s` sweeps the typical step from 1e-3 to
~30 in units of `1/‖A‖`. The derivative is the gradient of `log p(y)` with respect to
`(A, Q, R)` (all 9 entries) along two random directions per point (ours in forward and
reverse mode); the larger of the two errors is plotted. Ours is
`statespace.log_likelihood(ContinuousLinearSSM(A, Q, H, R), y, times)`; plain JAX is the naive
continuous-time route of the benchmarks: Van Loan through `jax.scipy.linalg.expm` per interval,
`P∞` by the dense Kronecker solve, a plain covariance Kalman filter in `jnp`. The mpmath
reference runs the same filter with 40-digit discretisations.
""")

code(r"""
A_ll = np.array([[-0.2, 1.0], [0.0, -1.5]])   # two time scales: eigenvalues −0.2 and −1.5
Q_ll = np.array([[0.5, 0.2], [0.2, 1.0]])
R_ll = np.array([[0.1]])
H_ll = np.array([[1.0, 0.0]])
num_times = 16
tau = np.cumsum(np.concatenate([[0.0], rng.exponential(1.0, num_times - 1)]))
y_ll = rng.standard_normal((num_times, 1))


def ours_ll(A, Q, R, times, y):
    model = statespace.ContinuousLinearSSM(A, Q, jnp.asarray(H_ll), R)
    return (statespace.log_likelihood(model, y, times),)


def plain_ll(A, Q, R, times, y):
    H = jnp.asarray(H_ll)
    P = plain_lyap(A, Q)
    m = jnp.zeros(2)
    total = 0.0
    for k in range(num_times):
        if k > 0:
            F, Qd = van_loan(A, Q, times[k] - times[k - 1])
            m, P = F @ m, F @ P @ F.T + Qd
        S = H @ P @ H.T + R
        e = y[k] - H @ m
        gain = P @ H.T @ jnp.linalg.inv(S)
        total = total - 0.5 * (jnp.log(2 * jnp.pi * S[0, 0]) + e @ jnp.linalg.solve(S, e))
        m, P = m + gain @ e, P - gain @ S @ gain.T
    return (total,)


def mp_ll(times, y):
    def f(A, Q, R):
        H = to_mp(H_ll)
        P = mp_lyap(A, Q)
        m = mpmath.matrix(2, 1)
        total = mpmath.mpf(0)
        for k in range(len(times)):
            if k > 0:
                F, Qd = mp_disc(mpmath.mpf(float(times[k])) - mpmath.mpf(float(times[k - 1])))(A, Q)
                m, P = F * m, F * P * F.T + Qd
            S = (H * P * H.T)[0, 0] + R[0, 0]
            e = mpmath.mpf(float(y[k, 0])) - (H * m)[0, 0]
            gain = P * H.T / S
            total -= (mpmath.log(2 * mpmath.pi * S) + e * e / S) / 2
            m, P = m + gain * e, P - gain * S * gain.T
        return (total,)
    return f


ll_x, ll_rows = [], []
for scale in np.logspace(-3, 1.5, 7):
    times = scale * tau
    ll_x.append(scale * np.abs(np.linalg.eigvals(A_ll)).max())
    per_direction = [errors_along(ours_ll, plain_ll, mp_ll(times, y_ll), [A_ll, Q_ll, R_ll],
                                  [unit((2, 2)), sym_unit(2), unit((1, 1))], extra=(times, y_ll))
                     for _ in range(2)]
    ll_rows.append({name: max(r[name] for r in per_direction) for name in STYLE})
table(ll_x, ll_rows, "dt*|lambda|")
""")

code(r"""
fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
eps_line = lambda x: EPS * np.asarray(x)
plot_sweep(axes[0, 0], lyap_x, lyap_rows, "κ(I ⊗ A + A ⊗ I)", "rules.lyap", eps_line(lyap_x))
plot_sweep(axes[0, 1], dlyap_x, dlyap_rows, "κ(I − A ⊗ A)", "rules.dlyap", eps_line(dlyap_x))
plot_sweep(axes[0, 2], expm_x, expm_rows, "‖A‖₁", "rules.expm")
plot_sweep(axes[1, 0], disc_x, disc_rows, "dt  (‖A‖₂ ≈ 2)", "statespace.discretize")
plot_sweep(axes[1, 1], ll_x, ll_rows, "mean step × max|λ(A)|", "log-likelihood gradient")
axes[1, 2].axis("off")
handles, labels = axes[0, 0].get_legend_handles_labels()
axes[1, 2].legend(handles, labels, loc="center", fontsize=12)
fig.suptitle("Relative error of derivatives vs a 40-digit mpmath reference (clipped to [1e-17, 10])")
fig.tight_layout()
plt.show()
""")

md(r"""
## `statespace.testing.check_derivatives`: the same check in one call

The package ships the reference machinery used above as a helper for your own notebooks:
give it a JAX function and, optionally, an mpmath version of it; it reports the JVP and VJP
relative error along a few random directions (without `reference=` it falls back to
Richardson-extrapolated float64 differences, good to about 1e-10: enough to catch a wrong
derivative, not to rank two right ones).
""")

code(r"""
A = V @ np.diag([-0.5, -1.0, -2.0, -3.0]) @ np.linalg.inv(V)


def mp_lyap_of_A(A_obj):
    # check_derivatives hands the perturbed A as an object array of mpf (at its working precision)
    X = mp_lyap(mpmath.matrix(A_obj.tolist()), to_mp(Q_lyap))
    return np.array(X.tolist(), dtype=object)


report = check_derivatives(rules.lyap, (jnp.asarray(A), jnp.asarray(Q_lyap)), reference=mp_lyap_of_A)
print(report)
print("Richardson fallback:", check_derivatives(rules.lyap, (jnp.asarray(A), jnp.asarray(Q_lyap))))
""")

md(r"""
## What the plots show

Numbers are those printed above (float64, CPU; the sweeps are deterministic, seeded).

* **`lyap` and `dlyap`.** For well-conditioned operators (`κ ≲ 10²`) every exact route is at
  the rounding level, 1e-16 – 1e-15. As `κ` grows, the dense Kronecker solve's error grows
  roughly like `κ ε` (dotted line), the forward-error bound of any backward-stable solve:
  1.7e-12 for `lyap` at `κ = 3.5e6`, 5.8e-12 for `dlyap` at `κ = 1e6`. **Ours stays at the
  rounding level at every `κ`** (≤ 3.4e-16 in both modes on both sweeps): each of our
  solves, the primal and every tangent or cotangent solve, ends with one step of iterative
  refinement with the same factors, its residual computed with the original `A` in about
  twice the working precision (an error-free splitting of the products). Before that step
  our forward mode followed the `κ ε` line, ~100× above the dense solve (1.6e-10 at
  `κ = 3.5e6`, 1.1e-10 at `κ = 1e6`): the Schur form (and, for `dlyap`, the Cayley
  transform) rounds the eigenvalue near the stability boundary with a relative error
  `≈ ε ‖A‖ / |λ|`, and every derivative solve inherited it. The dense Kronecker solve costs
  `(2/3) n⁶` flops and `n⁴` memory (at `n = 64` a 4096 × 4096 system, 16.7 million entries),
  so it is a test oracle, not a method; our Schur-based solve is `O(n³)` (the refinement
  adds a second triangular sweep per solve: `python -m benchmarks lyap`).
* **`expm`.** Ours and autodiff through `jax.scipy.linalg.expm` agree within a factor of ~3 at
  every norm: 1e-16 for `‖A‖₁ ≤ 1`, growing slowly to 3–5e-14 at `‖A‖₁ = 1e3`, where both
  scale and square about eight times. Accuracy is not what separates them at these norms (speed under
  `vmap` and memory in reverse mode are, see `python -m benchmarks`); ours also keeps working
  past `‖A‖₁ ≈ 7e5`, where `jax.scipy.linalg.expm` returns NaN (not swept here).
* **`discretize`.** Ours stays at 1e-16 – 2e-15 over eight decades of `dt`. Van Loan's block
  exponential through `jax.scipy.linalg.expm` is equally good up to `dt ≈ 0.5`, then breaks:
  2.7e-12 at `dt = 7.2` and a meaningless 6e57 at `dt = 100`. The reason is the block itself:
  `Qd = F M₁₂` multiplies a tiny `F = e^{A dt}` (set by the slowest mode) by an `M₁₂` that
  carries `e^{−A dt}` of the fastest mode, so its rounding error is about
  `ε e^{(|λ_fast| − |λ_slow|) dt}`; with eigenvalues −0.3 and −2, `e^{170} ε` at `dt = 100`.
* **Log-likelihood gradient.** Ours is at 2e-16 – 5e-15 for every time scale, in both modes.
  The naive continuous-time route is as good while the steps are short (≤ 2.4e-15 up to a
  typical step of 1.5 in units of `1/max|λ|`) and then inherits Van Loan's failure: 4e-5 at a mean step of 8.4 and a
  useless 6e5 at 47 (this model has time scales 1/0.2 and 1/1.5, so it is the spread of the
  eigenvalues, not `‖A‖`, that hurts). Long gaps are common in real irregular data.
* **Finite differences** never come close: at best 5e-12 – 1e-8 (the `ε^{2/3}` floor); they lose all accuracy for ill-conditioned Lyapunov operators (the step `h ≈ 6e-6`
  becomes comparable to the distance of an eigenvalue from the stability boundary) and at
  small `dt` (1.4e-6 at `dt = 1e-6`, where `F ≈ I` and the difference cancels).
* `check_derivatives` with the mpmath reference reproduces the `lyap` result for a
  well-conditioned `A` (≤ 1.5e-15 in both modes); its float64 Richardson fallback reports
  2e-14 – 1e-12, which is its own floor, not an error of `rules.lyap`.

The final cell re-checks the claims the text relies on (our derivatives within 1e-9 of the
reference everywhere in these sweeps) every time the notebook runs.
""")

code(r"""
sweeps = {"lyap": lyap_rows, "dlyap": dlyap_rows, "expm": expm_rows,
          "discretize": disc_rows, "log_likelihood": ll_rows}
summary = {
    name: {method: float(max(r[method] for r in rows)) for method in STYLE}
    for name, rows in sweeps.items()
}
summary["check_derivatives_lyap"] = report.max_error
summary["seconds"] = time.perf_counter() - started
print("GRADIENT_ACCURACY_SUMMARY " + json.dumps(summary))

# The claims the text makes, checked every time the notebook runs (tests/test_notebook.py):
ours_max = max(max(v["ours (jvp)"], v["ours (vjp)"]) for k, v in summary.items() if isinstance(v, dict))
assert ours_max < 1e-9, ours_max
assert report.max_error < 1e-12, report
""")


def build():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in CELLS:
        cell = nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
        nb.cells.append(cell)
    return nb


def script_text() -> str:
    parts = []
    for kind, text in CELLS:
        if kind == "code":
            parts.append("\n".join(line for line in text.splitlines() if not line.startswith("%")))
    return "\n\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execute", action="store_true", help="run the notebook in place (nbclient)")
    parser.add_argument("--update-text", action="store_true",
                        help="only replace the markdown of the existing executed notebook")
    parser.add_argument("--script", type=pathlib.Path, help="write the code cells as one .py file")
    parser.add_argument("--output", type=pathlib.Path, default=NOTEBOOK)
    args = parser.parse_args(argv)
    if args.script:
        args.script.write_text(script_text())
        return
    import nbformat

    nb = build()
    if args.update_text:
        # keep the executed code cells (and their outputs) of the existing notebook and take the
        # markdown from here, refusing if any code cell changed (that needs --execute)
        old = nbformat.read(args.output, as_version=4)
        if [c.source for c in old.cells if c.cell_type == "code"] != [c.source for c in nb.cells if c.cell_type == "code"]:
            raise SystemExit("code cells changed: run with --execute")
        for new_cell, old_cell in zip(nb.cells, old.cells):
            if new_cell.cell_type == "code":
                new_cell.outputs = old_cell.outputs
                new_cell.execution_count = old_cell.execution_count
    elif args.execute:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
