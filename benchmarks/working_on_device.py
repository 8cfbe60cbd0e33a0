"""Experiment: a host-vector Landscape's spectrum with the Lanczos working vectors on the model's device.

In the host-vector mode (the 1B Llama under the 1.5x plan) every Lanczos step's arithmetic runs on the host
(about a dozen passes over 4.4 GB float32 vectors a step) and each product streams its input and output
through host memory. The streamed HVP takes device vectors as well (``HostVectors.hvp_rows``): this runs
``scale.py`` with the spectrum metric's vectors on the device and the basis in page-locked host memory (the
offloaded Lanczos), to measure what that placement would save before the memory plan offers it. Same
arguments as ``scale.py``.

    python benchmarks/working_on_device.py models --cases llama-1b:fp32:spectrum \
        --metric-options '{"spectrum": {"max_iter": 10}}' --out r.json
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale

# the module: geomprobe.metrics exports the metric function under the same name
spectrum = importlib.import_module("geomprobe.metrics.spectrum")


def on_device(land):
    if not getattr(on_device, "said", False):
        print(f"working vectors on {land.device}", flush=True)
        on_device.said = True
    return land.device


spectrum.vector_device = on_device

if __name__ == "__main__":
    scale.main()
