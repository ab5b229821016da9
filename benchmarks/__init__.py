"""Side-by-side benchmarks against the peers (dynamax, plain JAX, SciPy).

Run ``python -m benchmarks`` for every area, or ``python -m benchmarks.<area>`` for one.
"""
