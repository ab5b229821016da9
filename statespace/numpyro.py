"""PLACEHOLDER (being written): NumPyro distributions."""
