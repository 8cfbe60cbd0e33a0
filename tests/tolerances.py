"""Tolerances used by the tests, named and kept in one place (by dtype where it matters)."""

# Dense float64 references (exact arithmetic up to rounding).
FLOAT64_REL = 1e-6          # eigenvalues from Lanczos/HVP against the dense float64 Hessian
FLOAT64_EXACT = 1e-10       # two float64 routes to the same product (batched vs single, split vs joined)
FLOAT32_REL = 1e-3          # the same quantities computed in float32
BF16_REL = 1e-2             # eigenvalues from a bf16 matvec and bf16 Lanczos vectors (8 bits of mantissa)
HALF_ACCUMULATION_REL = 1e-5  # a bf16/fp16 inner product accumulated in float32, relative to sum |a_i b_i|

# Stochastic estimators: a reported standard error must cover the truth at this many sigmas.
SIGMAS = 4.0

# Optimizers (geomprobe.optim), float64 unless named otherwise.
TR_MODEL_SLACK = 1e-10      # CG's model value may exceed the Cauchy point's by this · max(1, |m|) (rounding)
TR_RHO_ROUNDING = 1e-12     # on an exact quadratic |actual − predicted decrease| ≤ this · loss (cancellation)
TR_CONVERGED = 1e-6         # ‖w − w*‖_∞ that counts as converged (Rosenbrock, quadratics)
TR_CONVERGED_FLOAT32 = 1e-3  # the same in float32

# Geometry metrics (tests/test_metrics_*.py).
# sampled R_med of a 1e5-coordinate block against its exact value (docs/metrics.md#rmed / issue 3)
RMED_LARGE_REL = 0.10
# closed-form diagonal-share baselines against the values printed in docs/metrics.md#diagshare
BASELINE_ABS = 1e-4
# our Monte Carlo of delta(E|H|) against the Monte Carlo of docs/metrics.md#diagshare (both carry MC noise)
MC_BASELINE_ABS = 2e-3
WIGNER_MC_ABS = 2e-4        # the same for the Wigner baseline at d = 100 (values near 0.0100)
OLS_ASYMPTOTIC_ABS = 5e-3   # the OLS closed form is a large-n limit: its gap to Monte Carlo at n = 32
COVERAGE_MIN = 0.85         # share of seeds whose nominal-95 % interval must cover the truth
COVERAGE_SIGMAS = 3.0       # over n seeds, coverage >= level - this * sqrt(level (1 - level) / n) (binomial noise)
PACKED_CALIBRATION = (0.8, 1.25)  # mean squared contamination over mean squared reported error, many reads

# Gradient noise (tests/test_noise_*.py, test_persample.py, test_isotropy.py).
TAIL_MEAN_1E4 = 0.05        # |mean alpha_hat - alpha| over 20 SaS samples of N = 1e4 (docs/metrics.md#noise table)
TAIL_STD_1E4 = 0.10         # std of alpha_hat over those 20 samples
TAIL_MEAN_1E5 = 0.03        # the same at N = 1e5
TAIL_STD_1E5 = 0.05
# pooled Gaussians of log-normal scales vs docs/metrics.md#noise (2.03/1.87/1.52/0.93); standardized vs 2
POOLED_ALPHA_ABS = 0.10
SE_CALIBRATION = (0.5, 2.0)  # std of (estimate - truth)/reported error over seeds must fall in this range

# Trajectory analytics and reports (tests/test_trajectory.py, test_report.py).
ENVELOPE_REL = 1e-9         # the (L0, L1) line may sit this far (relative to max sharpness) below a point it fits
LP_OBJECTIVE_REL = 1e-7     # exact vertex solution of the 2-variable LP against scipy's HiGHS (its own tolerance)
Z95 = 1.96                  # a 95 % half-width in standard errors: single-draw checks widen it to SIGMAS
