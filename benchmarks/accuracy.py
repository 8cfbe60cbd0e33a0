"""Accuracy per HVP: geomprobe's Lanczos and trace estimators against a converged reference and PyHessian's defaults.

For each model: the reference is Lanczos run to a 1e-7 residual bound (float32); geomprobe runs Lanczos to its
default tol 1e-3; PyHessian runs power iteration at its defaults (maxIter 100, tol 1e-3 relative change).
HVPs are counted for both (PyHessian's by wrapping its hessian_vector_product). The anchors of anchors.py run
where their libraries import: curvlinops' Hessian into scipy's eigsh (ARPACK, at its default tol 0 and at 1e-3)
and hessian-eigenthings' power iteration and Lanczos at their defaults, each for lambda_max and, where the
method has it, lambda_min; a missing library or a failure is recorded as ``<anchor>_failure``. The trace part compares
Hutchinson, Hutch++, the Krylov-deflated estimator and PyHessian's trace on a model small enough for the exact
trace (d exact HVPs), at initialization and after training on structured synthetic data.

    python benchmarks/accuracy.py --device cuda --out benchmarks/results/accuracy_h100.json
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anchors  # noqa: E402
import models  # noqa: E402
from timing import dump, environment, model_benchmark_parser, strict_fp32  # noqa: E402

import geomprobe as gp  # noqa: E402
from geomprobe import linalg  # noqa: E402


def pyhessian_counted():
    """PyHessian's ``hessian`` class with its HVP calls counted (None when pyhessian is not installed)."""
    try:
        import pyhessian  # noqa: F401  (its __init__ shadows the module name with the class)
    except ImportError:
        return None, None
    ph = sys.modules["pyhessian.hessian"]
    if hasattr(ph.hessian_vector_product, "count"):
        return ph.hessian, ph.hessian_vector_product.count
    count = {"n": 0}
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        count["n"] += 1
        return original(gradsH, params, v)

    counted.count = count
    ph.hessian_vector_product = counted
    return ph.hessian, count


def steps_to_accuracy(land, lmax, seeds, target=1e-3, max_steps=300):
    """HVPs until lambda_max is within ``target`` (relative, true error) for Lanczos and for power iteration
    (PyHessian's algorithm: v <- Hv/|Hv|, Rayleigh quotient), median over seeds; None if never reached."""
    lz, pw = [], []
    for s in range(seeds):
        r = linalg.lanczos(land.hvp, land.dim, tol=0.0, max_iter=80, dtype=land.dtype, device=land.device,
                           generator=linalg.default_generator(s))
        hit = None
        for j in range(1, r.steps + 1):
            T = torch.diag(r.alpha[:j]) + torch.diag(r.beta[: j - 1], 1) + torch.diag(r.beta[: j - 1], -1)
            if abs(float(torch.linalg.eigvalsh(T)[-1]) - lmax) <= target * abs(lmax):
                hit = j
                break
        lz.append(hit)
        g = linalg.default_generator(s)
        v = torch.randn(land.dim, generator=g, dtype=torch.float64).to(device=land.device, dtype=land.dtype)
        v = v / v.norm()
        hit = None
        for i in range(1, max_steps + 1):
            hv = land.hvp(v)
            if abs(float(hv @ v) - lmax) <= target * abs(lmax):
                hit = i
                break
            v = hv / hv.norm()
        pw.append(hit)
    med = lambda xs: statistics.median(xs) if all(x is not None for x in xs) else None
    return {"lanczos_hvps_to_1e-3": med(lz), "power_hvps_to_1e-3": med(pw), "power_runs_reaching": sum(x is not None for x in pw)}


def anchor_rows(model, loss_fn, x, y, device, seeds: int, lmax: float, lmin: float) -> dict:
    """Each anchor of ``anchors.ANCHORS`` over ``seeds`` seeds against the reference: medians of the HVPs and of
    the true errors (lambda_max relative; lambda_min relative and over the spread lambda_max - lambda_min, as for
    geomprobe), the total HVPs and seconds of a call (operator set-up included), and how many runs the library
    itself called converged. A library that does not import gives ``<anchor>_failure`` "not installed (...)";
    a run that raises gives its message's first line there, and the seeds before it are still summarized."""
    rows: dict = {}
    spread = lmax - lmin
    med = statistics.median
    for name, fn in anchors.ANCHORS.items():
        runs = []
        for s in range(seeds):
            try:
                runs.append(fn(model, loss_fn, x, y, device, s))
            except ImportError as e:
                rows[f"{name}_failure"] = f"not installed ({str(e).splitlines()[0][:120]})"
                break
            except Exception as e:          # the library's own failure, or anchors.HVPBudgetExceeded
                rows[f"{name}_failure"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                break
            finally:
                model.zero_grad(set_to_none=True)
        if not runs:
            continue
        rows[f"{name}_runs"] = len(runs)
        err_max = [abs(r["lmax"] - lmax) / abs(lmax) for r in runs]
        rows.update({f"{name}_lambda_max_hvps_median": med(r["lmax_hvps"] for r in runs),
                     f"{name}_lambda_max_rel_err_median": med(err_max), f"{name}_lambda_max_rel_err_max": max(err_max)})
        if runs[0]["lmin"] is not None:
            rows.update({
                f"{name}_lambda_min_hvps_median": med(r["lmin_hvps"] for r in runs),
                f"{name}_lambda_min_rel_err_median": med(abs(r["lmin"] - lmin) / abs(lmin) for r in runs),
                f"{name}_lambda_min_err_over_spread_median": med(abs(r["lmin"] - lmin) / spread for r in runs),
            })
        if "setup_hvps" in runs[0]:
            rows[f"{name}_setup_hvps_median"] = med(r["setup_hvps"] for r in runs)
        rows.update({f"{name}_hvps_median": med(r["hvps"] for r in runs),
                     f"{name}_seconds_median": med(r["seconds"] for r in runs)})
        for end in ("lmax", "lmin"):
            if f"{end}_converged" in runs[0]:
                key = f"{name}_lambda_{end[1:]}_converged_runs"
                rows[key] = sum(r[f"{end}_converged"] for r in runs)
    return rows


def eigen_rows(name, device, batch, small, seeds):
    """lambda_max and lambda_min of one model: the reference, geomprobe's Lanczos, power iteration and Lanczos
    to a true 1e-3, PyHessian, and the anchors of anchors.py (``anchor_rows``)."""
    g = torch.Generator().manual_seed(0)
    model, loss_fn, (x, y) = models.make(name, batch, device, g, small=small)
    model.eval()
    land = gp.Landscape(model, loss_fn, (x, y))
    ref = linalg.lanczos(land.hvp, land.dim, tol=1e-7, max_iter=400, dtype=land.dtype, device=land.device,
                         generator=linalg.default_generator(123))
    lmax, lmin = ref.top(1)[0][0], ref.bottom(1)[0][0]
    spread = lmax - lmin
    rows = {"model": name, "params": land.dim, "batch": batch, "ref_lambda_max": lmax, "ref_lambda_min": lmin,
            "ref_converged": ref.converged, "ref_steps": ref.steps,
            "ref_lambda_max_err": ref.top(1)[1][0], "ref_lambda_min_err": ref.bottom(1)[1][0]}
    gp_err_max, gp_err_min, gp_hvps_max, gp_hvps_min = [], [], [], []
    gap_err, gap_hvps, gap_cover = [], [], []
    for s in range(seeds):
        r = linalg.lanczos(land.hvp, land.dim, which="largest", tol=1e-3, dtype=land.dtype, device=land.device,
                           generator=linalg.default_generator(s))
        gp_err_max.append(abs(r.top(1)[0][0] - lmax) / abs(lmax))
        gp_hvps_max.append(r.matvecs)
        r = linalg.lanczos(land.hvp, land.dim, which="largest", tol=1e-3, bound="gap", dtype=land.dtype,
                           device=land.device, generator=linalg.default_generator(s))
        gap_err.append(abs(r.top(1)[0][0] - lmax) / abs(lmax))
        gap_hvps.append(r.matvecs)
        gap_cover.append(abs(r.top(1)[0][0] - lmax) <= r.top(1)[1][0] + 1e-7 * abs(lmax))
        r = linalg.lanczos(land.hvp, land.dim, which="smallest", tol=1e-3, dtype=land.dtype, device=land.device,
                           generator=linalg.default_generator(s))
        gp_err_min.append(abs(r.bottom(1)[0][0] - lmin) / spread)
        gp_hvps_min.append(r.matvecs)
    rows.update({
        "gp_lambda_max_rel_err_median": statistics.median(gp_err_max), "gp_lambda_max_rel_err_max": max(gp_err_max),
        "gp_lambda_max_hvps_median": statistics.median(gp_hvps_max),
        "gp_lambda_min_err_over_spread_median": statistics.median(gp_err_min),
        "gp_lambda_min_hvps_median": statistics.median(gp_hvps_min),
        "gp_gap_lambda_max_hvps_median": statistics.median(gap_hvps),
        "gp_gap_lambda_max_rel_err_median": statistics.median(gap_err), "gp_gap_lambda_max_rel_err_max": max(gap_err),
        "gp_gap_bound_covers_truth": all(gap_cover),
    })
    rows.update(steps_to_accuracy(land, lmax, seeds))
    H, count = pyhessian_counted()
    if H is not None:
        errs, hvps = [], []
        for s in range(seeds):
            torch.manual_seed(s)
            count["n"] = 0
            try:
                h = H(model, loss_fn, data=(x, y), cuda=torch.device(device).type == "cuda")
                ev, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
            except RuntimeError as e:       # e.g. fused attention without double backward
                rows["pyhessian_failure"] = str(e).splitlines()[0][:160]
                model.zero_grad(set_to_none=True)
                break
            errs.append(abs(ev[0] - lmax) / abs(lmax))
            hvps.append(count["n"])
            model.zero_grad(set_to_none=True)   # PyHessian leaves a create_graph .grad behind
            del h
        if errs:
            rows.update({"pyhessian_rel_err_median": statistics.median(errs), "pyhessian_rel_err_max": max(errs),
                         "pyhessian_hvps_median": statistics.median(hvps)})
    rows.update(anchor_rows(model, loss_fn, x, y, device, seeds, lmax, lmin))
    return rows


def _structured_data(n, device, g):
    """Inputs with a non-zero mean and a decaying covariance (as real data have) and a teacher's labels."""
    scales = 3.0 / torch.arange(1, 785, dtype=torch.float32).sqrt()
    x = torch.randn(n, 784, generator=g) * scales + 0.5
    y = ((x - 0.5) @ torch.randn(784, 10, generator=g)).argmax(1)
    return x.to(device), y.to(device)


def trace_rows(device, seeds, train_steps=500):
    """Trace estimators against the exact trace (d exact diagonal entries) at initialization and after
    training, at equal HVP budgets; the RMSE over ``seeds`` draws gives the HVPs needed for a given error."""
    g = torch.Generator().manual_seed(1)
    x, y = _structured_data(256, device, g)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    rows = []
    for state in ("init", "trained"):
        if state == "trained":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(train_steps):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            model.zero_grad(set_to_none=True)
        land = gp.Landscape(model, loss_fn, (x, y), chunk_size=256)
        exact = float(linalg.exact_diagonal(land.hvp, land.dim, batch=256, dtype=land.dtype, device=land.device).sum())
        out = {"model": "mlp784-64-10", "state": state, "params": land.dim, "loss": land.loss, "exact_trace": exact,
               "seeds": seeds}
        kw = dict(batch=64, dtype=land.dtype, device=land.device)
        estimators = {
            "hutchinson": lambda m, s: linalg.hutchinson_trace(land.hvp, land.dim, samples=m, generator=linalg.default_generator(s), **kw),
            "hutchpp": lambda m, s: linalg.hutchpp_trace(land.hvp, land.dim, matvecs=m, generator=linalg.default_generator(s), **kw),
            "deflated": lambda m, s: linalg.deflated_trace(land.hvp, land.dim, matvecs=m, generator=linalg.default_generator(s), **kw),
        }
        for m in (30, 99, 300):
            rmse = {}
            for name, fn in estimators.items():
                rs = [fn(m, s) for s in range(seeds)]
                rmse[name] = (sum((r.trace - exact) ** 2 for r in rs) / len(rs)) ** 0.5 / abs(exact)
                out[f"{name}_{m}_rel_rmse"] = rmse[name]
                out[f"{name}_{m}_reported_rel_se"] = statistics.median(r.trace_err for r in rs) / abs(exact)
            # HVPs for Hutchinson's error, as a fraction of Hutchinson's: variance falls as 1/HVPs
            out[f"deflated_{m}_hvp_fraction_for_equal_error"] = (rmse["deflated"] / rmse["hutchinson"]) ** 2
        H, count = pyhessian_counted()
        if H is not None:
            errs, hvps = [], []
            for s in range(min(seeds, 5)):
                torch.manual_seed(s)
                count["n"] = 0
                h = H(model, loss_fn, data=(x, y), cuda=torch.device(device).type == "cuda")
                t = sum(h.trace(maxIter=100, tol=1e-3)) / max(1, count["n"])
                errs.append(abs(t - exact) / abs(exact))
                hvps.append(count["n"])
                model.zero_grad(set_to_none=True)
                model.train()  # PyHessian leaves the model in eval mode
            out["pyhessian_trace_rel_err_median"] = statistics.median(errs)
            out["pyhessian_trace_hvps_median"] = statistics.median(hvps)
        rows.append(out)
    return rows


def main(argv=None):
    ap = model_benchmark_parser(__doc__, "mlp,resnet18,transformer")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-trace", action="store_true", help="skip the trace part (d exact HVPs)")
    ap.add_argument("--no-eigen", action="store_true", help="skip the eigenvalue part")
    ap.add_argument("--trace-seeds", type=int, default=20)
    ap.add_argument("--anchors", default="all", help=f"comma list of {', '.join(anchors.ANCHORS)}, or all / none")
    a = ap.parse_args(argv)
    strict_fp32()
    if a.anchors != "all":
        chosen = [] if a.anchors == "none" else a.anchors.split(",")
        unknown = set(chosen) - set(anchors.ANCHORS)
        if unknown:
            ap.error(f"unknown anchors {sorted(unknown)}")
        for name in list(anchors.ANCHORS):
            if name not in chosen:
                del anchors.ANCHORS[name]
    batch = a.batch or (128 if a.device.startswith("cuda") else 32)
    result = {"benchmark": "accuracy", "env": environment(a.device), "small": a.small, "eigen": [], "trace": None}
    for m in [] if a.no_eigen else a.models.split(","):
        result["eigen"].append(eigen_rows(m, a.device, batch, a.small, a.seeds))
        if a.out:  # written after every model, so a run cut short keeps what it measured
            dump(result, a.out)
    if not a.no_trace:
        result["trace"] = trace_rows(a.device, a.trace_seeds)
    dump(result, a.out)


if __name__ == "__main__":
    main()
