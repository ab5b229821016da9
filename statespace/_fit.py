"""Optax fitting loop and Hessian-based standard errors.

``fit`` runs any ``optax.GradientTransformation`` (Adam, SGD, L-BFGS, chains) on a scalar
loss for up to ``num_steps`` steps; ``fit(loss, params)`` alone runs L-BFGS until converged.
The steps run inside jitted ``lax.scan`` chunks of ``chunk_size`` steps; a Python loop over the
chunks updates a progress bar and stops early once the loss settles (``tol``, ``rtol``), the
gradient vanishes (``gtol``) or the loss turns non-finite. One chunk program is compiled once
and reused for every chunk (steps past ``num_steps`` are masked, not recompiled). With
``constraints=`` (a pytree of NumPyro transforms or constraints) the loss takes constrained
parameters and ``fit`` optimises their unconstrained images.

``standard_errors`` / ``covariance`` give the Laplace (observed-information) approximation at
an optimum: ``Cov ≈ H⁻¹`` with ``H = ∇² loss`` when ``loss`` is a negative log-likelihood or
negative log-posterior. ``H`` is built forward-over-reverse (``jax.jacfwd(jax.grad(loss))``),
so it runs through the forward-mode rules of ``rules`` applied to the reverse-mode gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from statespace.transforms import constrain, unconstrain

__all__ = [
    "FitResult",
    "fit",
    "standard_errors",
    "covariance",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_RTOL",
    "DEFAULT_GTOL",
]

#: step cap of :func:`fit` when ``num_steps`` is not given
DEFAULT_MAX_STEPS = 1000
#: relative loss-change tolerance of :func:`fit` without an optimizer or tolerances
DEFAULT_RTOL = 1e-12
#: gradient (largest absolute entry) tolerance of :func:`fit` without an optimizer or tolerances
DEFAULT_GTOL = 1e-6

_RUNNING, _CONVERGED, _NONFINITE, _GRADIENT, _RELATIVE = 0, 1, 2, 3, 4
_STATUS_TEXT = {
    _RUNNING: "reached num_steps",
    _CONVERGED: "converged: loss change below tol",
    _NONFINITE: "stopped: non-finite loss (params are the last ones with a finite loss)",
    _GRADIENT: "converged: gradient below gtol",
    _RELATIVE: "converged: relative loss change below rtol",
}


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Result of :func:`fit`.

    Attributes:
        params: fitted parameters (same pytree structure as the initial ``params``).
        losses: ``np.ndarray`` of shape ``(num_steps,)``; ``losses[k]`` is the loss at the
            parameters *before* step ``k`` (so ``losses[0]`` is the initial loss).
        loss: the loss at ``params`` (a Python float).
        num_steps: number of optimiser steps taken.
        converged: ``True`` when a tolerance (``tol``, ``rtol`` or ``gtol``) was met before
            ``num_steps``.
        status: a short human-readable reason for stopping.
        opt_state: the final optimiser state (to resume with another ``fit`` call; with
            ``constraints`` it is a state of the unconstrained parameters).
        unconstrained_params: with ``constraints``, the fitted unconstrained parameters
            (``params`` is their constrained image); otherwise ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import fit
        >>> res = fit(lambda p: jnp.sum((p - 3.0) ** 2), jnp.zeros(2), progress=False)
        >>> res.converged, res.status.startswith("converged"), res.num_steps == len(res.losses)
        (True, True, True)
        >>> float(res.losses[0]), round(res.loss, 6)   # at the initial and the fitted params
        (18.0, 0.0)
    """

    params: Any
    losses: np.ndarray
    loss: float
    num_steps: int
    converged: bool
    status: str
    opt_state: Any = dataclasses.field(repr=False, default=None)
    unconstrained_params: Any = dataclasses.field(repr=False, default=None)
    _loss_fn: Callable | None = dataclasses.field(repr=False, default=None)
    _args: tuple = dataclasses.field(repr=False, default=())
    _constrain: Callable | None = dataclasses.field(repr=False, default=None)

    def standard_errors(self, transform: Callable | None = None):
        """Standard errors at ``self.params`` from the Hessian of the fitted loss.

        With ``constraints`` the Hessian is taken in the unconstrained parameters (where the
        optimum is interior) and mapped to ``params`` by the delta method.

        Args:
            transform: optional map ``params -> quantities``; if given, the delta-method
                standard errors of ``transform(params)`` are returned.

        Returns:
            A pytree like ``params`` (or like ``transform(params)``) of standard errors.

        Raises:
            ValueError: the result carries no loss function.

        Example:
            >>> import jax.numpy as jnp
            >>> from statespace import fit
            >>> # the negative log-density of N(0, 2²) per coordinate: standard error 2
            >>> res = fit(lambda p: 0.5 * jnp.sum(p**2 / 4.0), jnp.ones(2), progress=False)
            >>> res.standard_errors().round(6).tolist()
            [2.0, 2.0]
        """
        if self._loss_fn is None:
            raise ValueError("this FitResult carries no loss function")
        if self._constrain is None:
            return standard_errors(self._loss_fn, self.params, *self._args, transform=transform)
        to_constrained = self._constrain
        if transform is None:
            composed = to_constrained
        else:
            def composed(u):
                return transform(to_constrained(u))
        return standard_errors(self._loss_fn, self.unconstrained_params, *self._args,
                               transform=composed)


def _hessian_flat(loss: Callable, params, args):
    flat, unravel = ravel_pytree(params)

    def flat_loss(theta):
        return loss(unravel(theta), *args)

    # forward-over-reverse: one JVP of the reverse-mode gradient per parameter direction
    hess = jax.jit(jax.jacfwd(jax.grad(flat_loss)))(flat)
    return flat, unravel, hess


def covariance(loss: Callable, params, *args, transform: Callable | None = None):
    """Laplace covariance ``H⁻¹`` (or ``J H⁻¹ Jᵀ`` for ``transform``) at ``params``.

    ``H = ∇² loss(params)`` is computed forward-over-reverse on the flattened parameters
    (``jax.flatten_util.ravel_pytree`` order). With ``transform``, ``J = ∂ transform / ∂ params``
    (delta method) and the covariance is of the flattened ``transform(params)``.

    Args:
        loss: scalar function ``loss(params, *args)``, a negative log-likelihood or
            negative log-posterior (not an average over observations).
        params: the optimum (any pytree of float arrays).
        *args: extra arguments passed to ``loss``.
        transform: optional function of ``params`` returning a pytree of arrays.

    Returns:
        ``(cov, unravel)``: a ``(p, p)`` array and the function that maps a flat vector of
        length ``p`` back to the pytree structure of ``params`` (or of ``transform(params)``).
        A Hessian that is not positive definite gives NaN entries rather than an error.

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import covariance
        >>> # loss = Σ (p − 1)² / (2 · 0.25): the Hessian is 4 I, the covariance I / 4
        >>> loss = lambda p: jnp.sum((p["a"] - 1.0) ** 2 / 0.5)
        >>> cov, unravel = covariance(loss, {"a": jnp.zeros(2)})
        >>> cov.round(6).tolist()
        [[0.25, 0.0], [0.0, 0.25]]
        >>> unravel(jnp.diagonal(cov))["a"].round(6).tolist()
        [0.25, 0.25]
    """
    flat, unravel, hess = _hessian_flat(loss, params, args)
    chol = jnp.linalg.cholesky(hess)
    eye = jnp.eye(flat.shape[0], dtype=hess.dtype)
    cov = jax.scipy.linalg.cho_solve((chol, True), eye)
    if transform is None:
        return cov, unravel
    out_flat, out_unravel = ravel_pytree(transform(params))

    def flat_transform(theta):
        return ravel_pytree(transform(unravel(theta)))[0]

    jac = jax.jacfwd(flat_transform)(flat)
    return jac @ cov @ jac.T, out_unravel


def standard_errors(loss: Callable, params, *args, transform: Callable | None = None):
    """Standard errors ``sqrt(diag(H⁻¹))`` at an optimum ``params`` of ``loss``.

    ``loss`` must be a negative log-likelihood (or log-posterior) summed over the data, so
    that its Hessian is the observed information. See :func:`covariance` for the details.

    Args:
        loss: scalar function ``loss(params, *args)``.
        params: the optimum (any pytree of float arrays).
        *args: extra arguments passed to ``loss``.
        transform: optional map ``params -> quantities``; returns the delta-method standard
            errors of ``transform(params)`` instead (e.g. of positive scales fitted on the log
            scale).

    Returns:
        A pytree with the structure of ``params`` (or of ``transform(params)``). Entries are
        NaN where the Hessian is not positive definite (not at a strict minimum).

    Example:
        >>> import jax.numpy as jnp
        >>> from statespace import standard_errors
        >>> loss = lambda p: 0.5 * jnp.sum(p**2 / 4.0)  # N(0, 2²) per coordinate
        >>> standard_errors(loss, jnp.zeros(3)).round(6).tolist()
        [2.0, 2.0, 2.0]
        >>> standard_errors(loss, jnp.zeros(1), transform=lambda p: 3.0 * p).round(6).tolist()
        [6.0]
    """
    cov, unravel = covariance(loss, params, *args, transform=transform)
    return unravel(jnp.sqrt(jnp.diagonal(cov)))


def _stored_value_and_grad(opt_state):
    """``(value, grad)`` an optimiser keeps in its state (``optax.lbfgs`` and line-search
    chains store them at the accepted point), or ``None``."""
    try:
        value = optax.tree.get(opt_state, "value")
        grad = optax.tree.get(opt_state, "grad")
    except (KeyError, ValueError):  # several candidates: do not guess which one is ours
        return None
    if value is None or grad is None:
        return None
    return value, grad


def _seeded(opt_state, value_and_grad, params, args):
    """The state with its stored value and gradient set at ``params`` while the stored value
    is not finite (a fresh ``optax.lbfgs`` state holds ``inf``), cast to the stored dtypes
    (they ride in a scan carry); unchanged otherwise. Traced: a ``lax.cond``."""

    def seed(state):
        value, grad = _stored_value_and_grad(state)
        new_value, new_grad = value_and_grad(params, *args)
        cast = lambda new, old: jnp.asarray(new).astype(old.dtype)  # noqa: E731
        return optax.tree.set(state, value=cast(new_value, value),
                              grad=jax.tree_util.tree_map(cast, new_grad, grad))

    stored_value = _stored_value_and_grad(opt_state)[0]
    return jax.lax.cond(jnp.isfinite(stored_value), lambda state: state, seed, opt_state)


def _fit_options(optimizer, num_steps, chunk_size, tol, rtol, gtol):
    """``(optimizer, num_steps, chunk_size, (tol, rtol, gtol))`` with :func:`fit`'s defaults.

    Raises:
        ValueError: ``num_steps < 0``, ``chunk_size < 1`` or a negative tolerance.
        TypeError: ``optimizer`` is not an optax gradient transformation.
    """
    if optimizer is None:
        optimizer = optax.lbfgs()
        if tol is None and rtol is None and gtol is None:
            rtol, gtol = DEFAULT_RTOL, DEFAULT_GTOL
    num_steps = DEFAULT_MAX_STEPS if num_steps is None else int(num_steps)
    chunk_size = int(chunk_size)
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for name, value in (("tol", tol), ("rtol", rtol), ("gtol", gtol)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
        )
    return optimizer, num_steps, chunk_size, (tol, rtol, gtol)


def _unconstrained_problem(loss, params, constraints):
    """``(loss, params, to_constrained)`` in the unconstrained space of ``constraints``
    (unchanged, with ``to_constrained = None``, without them).

    Raises:
        ValueError: an initial value outside its constraint (non-finite unconstrained image).
    """
    if constraints is None:
        return loss, params, None
    params = unconstrain(constraints, jax.tree_util.tree_map(jnp.asarray, params))
    bad = [jax.tree_util.keystr(path) or "params"
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if not bool(jnp.all(jnp.isfinite(leaf)))]
    if bad:
        raise ValueError(
            f"initial params outside their constraints (non-finite unconstrained value) "
            f"at {', '.join(bad)}"
        )
    to_constrained = functools.partial(constrain, constraints)

    def unconstrained_loss(u, *args):
        return loss(to_constrained(u), *args)

    return unconstrained_loss, params, to_constrained


def _stop_status(value, prev_loss, grad, taken, tolerances):
    """``(settled, status)`` of a step whose loss before the update is ``value``: the stopping
    rules of :func:`fit` (``status`` one of the ``_RUNNING`` ... ``_RELATIVE`` codes)."""
    tol, rtol, gtol = tolerances
    finite = jnp.isfinite(value)
    change = jnp.abs(value - prev_loss)
    moved = finite & (taken > 0)  # prev_loss is a loss (not the initial inf)
    small = moved & (tol is not None) & (change <= (tol or 0.0))
    relative = moved & (rtol is not None) & (
        change <= (rtol or 0.0) * jnp.maximum(jnp.abs(value), 1.0))
    grad_max = functools.reduce(
        jnp.maximum, [jnp.max(jnp.abs(g), initial=0.0) for g in jax.tree_util.tree_leaves(grad)],
        jnp.zeros((), dtype=jnp.result_type(float)),
    )
    flat = finite & (gtol is not None) & (grad_max <= (gtol or 0.0))
    status = jnp.where(finite, jnp.where(small, _CONVERGED, jnp.where(
        relative, _RELATIVE, jnp.where(flat, _GRADIENT, _RUNNING))), _NONFINITE)
    return small | relative | flat, status


def _step_function(loss, optimizer, value_in_state: bool, tolerances, num_steps: int):
    """One step of :func:`fit`'s scan: ``(carry, step_index, args) -> (carry, loss)`` with
    ``carry = (params, state, prev_params, prev_loss, status, taken)``; a no-op once stopped.

    ``value_in_state``: the optimiser keeps the value and gradient at its parameters in its
    state (``optax.lbfgs``), so the step reads them instead of evaluating the loss."""

    def where(pred, a, b):
        return jax.tree_util.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)

    def value_and_grad(params, state, args):
        if value_in_state:
            return _stored_value_and_grad(state)
        return jax.value_and_grad(loss)(params, *args)

    def one_step(carry, step_index, args):
        params, state, prev_params, prev_loss, status, taken = carry

        def active(_):
            value, grad = value_and_grad(params, state, args)
            finite = jnp.isfinite(value)
            updates, new_state = optimizer.update(
                grad, state, params, value=value, grad=grad, value_fn=lambda p: loss(p, *args))
            new_params = optax.apply_updates(params, updates)
            settled, new_status = _stop_status(value, prev_loss, grad, taken, tolerances)
            # on convergence keep the parameters the last loss was evaluated at; on a
            # non-finite loss go back to the previous (finite) ones
            new_carry = (where(settled, params, where(finite, new_params, prev_params)),
                         where(finite & ~settled, new_state, state),
                         where(finite, params, prev_params),
                         jnp.where(finite, value, prev_loss), new_status, taken + 1)
            # keep the carry's dtypes (float32 parameters under x64: the loss, the update or
            # the optimiser's state may come back as float64)
            new_carry = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_carry, carry)
            return new_carry, value.astype(prev_loss.dtype)

        def idle(_):
            return carry, jnp.full((), jnp.nan, dtype=prev_loss.dtype)

        run = (status == _RUNNING) & (step_index < num_steps)
        return jax.lax.cond(run, active, idle, None)

    return one_step


def _run_chunks(run_chunk, carry, args, num_steps, chunk_size, progress, description):
    """The Python loop over jitted chunks, with the progress bar and early stop:
    ``(carry, losses, steps_taken, status)``."""
    bar = None
    if progress and num_steps > 0:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, desc=description, leave=True, dynamic_ncols=True)
    losses = []
    taken = 0
    status = _RUNNING
    try:
        for start in range(0, num_steps, chunk_size):
            carry, chunk_losses = run_chunk(carry, jnp.asarray(start, jnp.int32), args)
            new_taken = int(carry[5])
            chunk_losses = np.asarray(chunk_losses)[: new_taken - taken]
            losses.append(chunk_losses)
            if bar is not None:
                bar.update(new_taken - taken)
                finite = chunk_losses[np.isfinite(chunk_losses)]
                if finite.size:
                    bar.set_postfix(loss=f"{finite[-1]:.6g}")
            taken = new_taken
            status = int(carry[4])
            if status != _RUNNING:
                break
    finally:
        if bar is not None:
            bar.close()
    losses = np.concatenate(losses) if losses else np.zeros((0,), dtype=np.float64)
    return carry, losses, taken, status


def fit(
    loss: Callable,
    params,
    *,
    optimizer: optax.GradientTransformation | None = None,
    num_steps: int | None = None,
    tol: float | None = None,
    rtol: float | None = None,
    gtol: float | None = None,
    constraints=None,
    progress: bool = True,
    chunk_size: int = 50,
    args: tuple = (),
    opt_state=None,
    description: str = "fit",
) -> FitResult:
    """Minimise ``loss(params, *args)`` with an optax optimiser (L-BFGS by default).

    ``fit(loss, params)`` alone runs ``optax.lbfgs()`` (with its zoom line search) until
    converged: until the loss changes by at most ``DEFAULT_RTOL = 1e-12`` relative to
    ``max(|loss|, 1)`` between steps, or the largest absolute entry of the gradient is at most
    ``DEFAULT_GTOL = 1e-6``, for at most ``DEFAULT_MAX_STEPS = 1000`` steps (``converged`` is
    ``False`` and ``status`` says so when the cap is reached first).

    The loop runs in jitted ``lax.scan`` chunks of ``chunk_size`` steps; between chunks a
    ``tqdm`` progress bar shows the current loss. Each step evaluates the loss and gradient at
    the current parameters, then applies the optimiser's update; the update receives
    ``value=``, ``grad=`` and ``value_fn=`` so line-search methods work, and optimisers that
    keep the value and gradient in their state (``optax.lbfgs``) have them reused through
    ``optax.value_and_grad_from_state``. Plain ``GradientTransformation`` objects are wrapped
    with ``optax.with_extra_args_support``. Compilation: the loss is traced once (as one jitted
    function) however many places a step evaluates it, and for optimisers that keep the value
    and gradient in their state the step itself does not evaluate it (the loop program seeds
    the state once, in a ``lax.cond``; the final loss comes from the loop's carry or that
    state): one XLA compile per fit, and an L-BFGS fit's loop program compiles in about half
    the time it took when every call site held its own copy.

    Stopping: after ``num_steps`` steps; or, setting ``converged``, when
    ``|loss_k - loss_{k-1}| <= tol`` (absolute change between consecutive steps), when
    ``|loss_k - loss_{k-1}| <= rtol · max(|loss_k|, 1)``, or when ``max |∇loss| <= gtol`` at the
    current parameters (each ``None`` disables it; without an ``optimizer`` and with all three
    ``None``, ``rtol`` and ``gtol`` take the defaults above); or when the loss becomes
    non-finite, in which case ``params`` are the last parameters with a finite loss and
    ``converged`` is ``False``.

    Constraints: with ``constraints``, a pytree like ``params`` whose leaves are NumPyro
    transforms (``numpyro.distributions.transforms.Transform``) or constraints
    (``numpyro.distributions.constraints.Constraint``, meaning ``biject_to(constraint)``, e.g.
    ``constraints.positive`` for ``exp`` or ``statespace.transforms.stable_matrix``),
    ``params`` and the ``loss``'s argument are *constrained* values; ``fit`` optimises
    ``u ↦ loss(constrain(constraints, u))`` from ``unconstrain(constraints, params)`` and
    returns the constrained optimum as ``params`` (``unconstrained_params`` holds ``u``, and
    ``standard_errors()`` uses the Hessian in ``u`` with the delta method).

    Args:
        loss: scalar function of ``(params, *args)``, differentiable in ``params``.
        params: initial parameters, any pytree of float arrays (constrained values when
            ``constraints`` is given).
        optimizer: an ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-2)``,
            ``optax.lbfgs()``); default ``optax.lbfgs()``.
        num_steps: maximum number of steps (>= 0); default ``DEFAULT_MAX_STEPS`` (1000).
        tol: absolute loss-change tolerance for early stopping, or ``None``.
        rtol: relative loss-change tolerance (relative to ``max(|loss|, 1)``), or ``None``.
        gtol: tolerance on the largest absolute gradient entry, or ``None``.
        constraints: optional pytree of NumPyro transforms or constraints matching ``params``.
        progress: show a ``tqdm`` progress bar on stderr.
        chunk_size: steps per jitted chunk (the progress bar updates once per chunk).
        args: extra arguments to ``loss``, passed as jit arguments (not baked in as constants).
        opt_state: optimiser state to resume from (default ``optimizer.init(params)``; of the
            unconstrained parameters when ``constraints`` is given).
        description: label of the progress bar.

    Returns:
        :class:`FitResult` with ``params``, ``losses`` (loss before each step taken), ``loss``
        (at the returned params), ``num_steps``, ``converged``, ``status``, ``opt_state``,
        ``unconstrained_params``, and a ``standard_errors()`` method (Hessian at the returned
        params).

    Raises:
        ValueError: ``num_steps < 0``, ``chunk_size < 1``, a negative tolerance, the structure
            of ``constraints`` differs from that of ``params``, or an initial value lies
            outside its constraint (its unconstrained image is not finite).
        TypeError: ``optimizer`` is not an optax gradient transformation, or a leaf of
            ``constraints`` is neither a NumPyro transform nor a constraint.

    Example:
        >>> import optax, jax.numpy as jnp
        >>> from statespace import fit
        >>> res = fit(lambda p: jnp.sum((p - 3.0) ** 2), jnp.zeros(2), progress=False)
        >>> res.converged, res.params.round(6).tolist()
        (True, [3.0, 3.0])
        >>> res = fit(lambda p: jnp.sum((p - 3.0) ** 2), jnp.zeros(2),
        ...           optimizer=optax.adam(0.1), num_steps=20, progress=False)
        >>> res.num_steps, res.converged, res.loss < float(res.losses[0])
        (20, False, True)
        >>> from numpyro.distributions import constraints
        >>> res = fit(lambda s: (jnp.log(s) - 1.0) ** 2, jnp.ones(()),
        ...           constraints=constraints.positive, progress=False)
        >>> round(float(res.params), 6)   # e
        2.718282
    """
    optimizer, num_steps, chunk_size, tolerances = _fit_options(
        optimizer, num_steps, chunk_size, tol, rtol, gtol)
    args = tuple(args)
    loss, params, to_constrained = _unconstrained_problem(loss, params, constraints)
    user_loss = loss  # of the unconstrained parameters: what standard_errors differentiates
    optimizer = optax.with_extra_args_support(optimizer)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if opt_state is None:
        opt_state = optimizer.init(params)
    # The loss enters the chunk program once per place the step evaluates it, and XLA inlines
    # every copy. (a) Optimisers that keep the value and gradient at the accepted point
    # (optax.lbfgs) need no evaluation of their own in the step: the chunk seeds their state
    # once (a cond, taken while the stored value is the initial inf). (b) The places that
    # remain (optax's zoom line search has two, one per branch) call one jitted loss, which
    # XLA compiles as one shared function. Measured on the continuous-time (4, 2, 1000) model,
    # L-BFGS to convergence: the loss traced 4 times -> once, the chunk's compile 10-11 s ->
    # 5 s plus 4.6-5 s for a separate seeding program; seeding inside the chunk instead
    # (one XLA compile of ~7 s) took the fresh-process fit from 13.4-14.7 s to 12.5-14.1 s.
    loss = loss if hasattr(loss, "lower") else jax.jit(loss)
    stored = _stored_value_and_grad(opt_state)
    # a fresh init holds inf; a resumed state already holds the value at its parameters
    seed = stored is not None and not bool(np.isfinite(np.asarray(stored[0])))
    one_step = _step_function(loss, optimizer, stored is not None, tolerances, num_steps)
    value_and_grad = jax.jit(jax.value_and_grad(loss))

    @jax.jit
    def run_chunk(carry, start, args):
        if seed:
            carry = (carry[0], _seeded(carry[1], value_and_grad, carry[0], args)) + carry[2:]
        steps = start + jnp.arange(chunk_size)
        return jax.lax.scan(lambda c, i: one_step(c, i, args), carry, steps)

    loss_dtype = jnp.result_type(float)
    carry = (params, opt_state, params, jnp.asarray(jnp.inf, dtype=loss_dtype),
             jnp.asarray(_RUNNING, dtype=jnp.int32), jnp.asarray(0, dtype=jnp.int32))
    carry, losses, taken, status = _run_chunks(
        run_chunk, carry, args, num_steps, chunk_size, progress, description)
    params_out, state_out = carry[0], carry[1]
    unconstrained_out = None
    if to_constrained is not None:
        unconstrained_out, params_out = params_out, to_constrained(params_out)
    if status in (_CONVERGED, _GRADIENT, _RELATIVE):
        final_loss = float(carry[3])  # the loss at the parameters kept
    elif status == _RUNNING and taken > 0 and stored is not None:
        final_loss = float(_stored_value_and_grad(state_out)[0])  # at the accepted parameters
    else:  # no step taken, or a non-finite loss (loss is jitted, above)
        final_loss = float(loss(carry[0], *args))
    return FitResult(
        params=params_out,
        losses=losses,
        loss=final_loss,
        num_steps=taken,
        converged=status in (_CONVERGED, _GRADIENT, _RELATIVE),
        status=_STATUS_TEXT[status],
        opt_state=state_out,
        unconstrained_params=unconstrained_out,
        _loss_fn=user_loss,
        _args=args,
        _constrain=to_constrained,
    )
