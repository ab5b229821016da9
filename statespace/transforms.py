"""PLACEHOLDER (being written): constrained <-> unconstrained parameter maps."""
