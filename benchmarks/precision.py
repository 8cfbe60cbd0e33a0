"""How close fp32 HVPs are to float64 ones, with geomprobe's double backward and with torch's: the `precision`
metric (Rademacher vectors through the Landscape and through a float64 copy of the model) on each model.

    python benchmarks/precision.py --device cuda --out benchmarks/results/precision_h100.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from timing import dump, environment, model_benchmark_parser, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402


def main(argv=None):
    ap = model_benchmark_parser(__doc__, "mlp,resnet18,transformer")
    ap.add_argument("--vectors", type=int, default=3)
    a = ap.parse_args(argv)
    strict_fp32()
    rows = []
    for name in a.models.split(","):
        model, loss_fn, (x, y) = models.make(name, a.batch or 128, a.device, torch.Generator().manual_seed(0), small=a.small)
        model.eval()
        row = {"model": name}
        for fast in (True, False):
            land = gp.Landscape(model, loss_fn, (x, y), fast_double_backward=fast)
            out = gp.metrics.precision(land, vectors=a.vectors)
            key = "fast" if fast else "torch"
            row[f"{key}_hvp_rel_err_max"] = out["hvp_rel_err"]
            row[f"{key}_hvp_rel_err_median"] = out["hvp_rel_err_median"]
            land.close()
        rows.append(row)
        print(row, file=sys.stderr)
    dump({"benchmark": "precision", "env": environment(a.device), "vectors": a.vectors, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
