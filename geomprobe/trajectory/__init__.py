"""Questions about a whole run, answered from its records: the (L0, L1)-smoothness fit
(:mod:`.smoothness`) and where sharpness meets the optimizer's stability threshold
(:mod:`.edge_of_stability`)."""

from .edge_of_stability import EdgeOfStability, edge_of_stability, stability_threshold
from .smoothness import SmoothnessFit, fit_l0_l1, smoothness_fit, spearman

__all__ = ["EdgeOfStability", "edge_of_stability", "stability_threshold", "SmoothnessFit", "fit_l0_l1",
           "smoothness_fit", "spearman"]
