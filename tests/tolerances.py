"""Tolerances used by the tests, named and kept in one place (by dtype where it matters)."""

# Dense float64 references (exact arithmetic up to rounding).
FLOAT64_REL = 1e-6          # eigenvalues from Lanczos/HVP against the dense float64 Hessian
FLOAT64_EXACT = 1e-10       # two float64 routes to the same product (batched vs single, split vs joined)
FLOAT32_REL = 1e-3          # the same quantities computed in float32

# Stochastic estimators: a reported standard error must cover the truth at this many sigmas.
SIGMAS = 4.0
