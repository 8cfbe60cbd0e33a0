"""The demo: small models and the embedded dataset (scikit-learn's bundled digits) for ``geomprobe demo``."""

from .data import load_digits_tensors
from .models import DigitsMLP
from .run import DEMO_METRICS, DEMO_OPTIMIZERS, DemoResult, probe_points, run_demo

__all__ = ["load_digits_tensors", "DigitsMLP", "run_demo", "DemoResult", "DEMO_OPTIMIZERS", "DEMO_METRICS",
           "probe_points"]
