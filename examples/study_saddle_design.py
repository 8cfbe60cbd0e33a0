"""Study 5's design: the saddle problem's constants, the optimizers, grids and escape criteria, shared by the
experiment (study_saddle.py) and its analysis and report (study_saddle_report.py)."""

from __future__ import annotations

import math
from typing import Any

CITATION = ('Staib, Reddi, Kale, Kumar, Sra, "Escaping saddle points with adaptive gradient methods" '
            '(ICML 2019)')
D = 20                 # parameters
GAMMA = 1.0            # λ_min = −γ at the saddle
LAM = (1.0, 10.0)      # positive eigenvalues, log-spaced
S_ESCAPE = 0.003       # noise std (per sample) along u_min
S_OTHER = (0.3, 3.0)   # noise stds along the other eigenvectors, log-spaced (largest with the smallest λ)
N = 4096               # data set size
BATCH = 32
STEPS = 2000           # step budget per run (censored if no escape)
P_NOISE = 64           # noise samples (minibatches) per probe
PROBE_AT = (1, 3, 10, 30, 100, 300, 1000)
FRAMES = ("aligned", "rotated")
OPTIMIZERS = ("sgd", "adam", "tr-sphere", "tr-rmsprop")
GRID: dict[str, list[dict[str, Any]]] = {
    "sgd": [{"lr": lr} for lr in (0.02, 0.05, 0.1, 0.15)],
    "adam": [{"lr": lr} for lr in (0.003, 0.01, 0.03, 0.1)],
    "tr-sphere": [{}],
    "tr-rmsprop": [{}],
}
TUNE_SEEDS = (100, 101)
LABELS = {"sgd": "SGD", "adam": "Adam", "tr-sphere": "TR sphere", "tr-rmsprop": "TR RMSProp",
          "aligned": "aligned", "rotated": "rotated"}
NEAR_FROM = 3            # probes pooled as 'near the saddle': before escape, from this step on
ESCAPE_R = 0.5 * math.sqrt(GAMMA)
ESCAPE_F = -GAMMA ** 2 / 8
