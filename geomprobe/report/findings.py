"""Findings worded for a person: what a run's records say about its geometry, in sentences.

Each finding has a ``kind`` (stable, for programs), a ``level`` (``warning``: an estimate or a probe may be
wrong; ``note``: something notable about the geometry; ``info``: a check that found nothing), the ``text``
and the numbers behind it (``data``). The checks:

* ``edge_of_stability``: η·sharpness against the optimizer's threshold (:mod:`geomprobe.trajectory.edge_of_stability`);
* ``smoothness``: the (L0, L1) envelope and how sharpness follows the gradient norm (:mod:`geomprobe.trajectory`);
* ``saddle``: probes the ``saddle`` metric flagged;
* ``noise``: heavy-tailed gradient noise, or scale heterogeneity mistaken for it (docs/metrics.md#noise);
* ``rmed``: how R_med moved along the run, and what the preconditioner did to it;
* ``diagshare``: the diagonal share against its Wigner and OLS baselines (docs/metrics.md#diagshare);
* ``unconverged``: estimates whose iteration stopped short; ``failures``: probes that recorded an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..trajectory.edge_of_stability import CONTRADICTED_RATIO, edge_of_stability
from ..trajectory.smoothness import smoothness_fit
from ._format import UNRESOLVED_FRACTION, fmt, fmt_err, fmt_steps, unresolved
from .summary import MIN_TREND_POINTS, collect_series, schedule_summary, summarize

__all__ = ["Finding", "findings", "rank_interval", "HEAVY_TAIL_ALPHA", "CONVERGED_KEYS", "MIN_TREND_POINTS",
           "MIN_EOS_PROBES"]

# Below this standardized tail index the noise is called heavy-tailed (2 is Gaussian; the estimator's spread
# at N = 1e4 values is about 0.1, docs/metrics.md#noise), provided the reported error keeps the upper bound below 2.
HEAVY_TAIL_ALPHA = 1.8
HEAVY_TAIL_SIGMAS = 2.0
# Flags a metric sets when an iteration stopped short.
CONVERGED_KEYS = ("converged", "lanczos_converged")
# The fewest probes above the stability threshold a crossing is reported on (one probe is one sample).
MIN_EOS_PROBES = 2


def rank_interval(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """A ``level`` confidence interval of a Spearman correlation ``rho`` from ``n`` points (Fisher's z with
    the Bonett-Wright variance (1 + rho²/2)/(n − 3); ``n`` >= 4). Costs nothing: a closed form.

    >>> [round(x, 2) for x in rank_interval(0.9, 10)]
    [0.53, 0.98]
    """
    from statistics import NormalDist

    r = min(max(rho, -0.9999), 0.9999)
    half = NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt((1 + r * r / 2) / (n - 3))
    z = math.atanh(r)
    return math.tanh(z - half), math.tanh(z + half)


def _rank_text(rho: float | None, n: int, what: str) -> str:
    """``; rank correlation with step 0.9 over 10 probes (95 % interval 0.58 to 0.98)``, or why none is given."""
    if n < MIN_TREND_POINTS:
        return f"; {n} probes are too few for a rank correlation (at least {MIN_TREND_POINTS})"
    if rho is None or not math.isfinite(rho):
        return ""
    lo, hi = rank_interval(rho, n)
    return f"; rank correlation {what} {fmt(rho, 2)} over {n} probes (95 % interval {fmt(lo, 2)} to {fmt(hi, 2)})"


@dataclass(frozen=True)
class Finding:
    """One statement about the run: ``kind``, ``level`` (warning/note/info), ``text`` and its ``data``."""

    kind: str
    level: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Records = Sequence[Mapping[str, Any]]


def _steps_where(records: Records, test: Callable[[Mapping[str, Any]], bool]) -> list[int]:
    return [int(r["step"]) for r in records if "step" in r and test(r)]


def _edge(records: Records, meta: Mapping[str, Any]) -> list[Finding]:
    eos = edge_of_stability(records, meta)
    if not eos.applicable:
        return [Finding("edge_of_stability", "info", f"Edge of stability not assessed: {eos.reason}.", eos.to_dict())]
    contradicted = (f" At {eos.contradicted} probe(s) η·sharpness was more than {fmt(CONTRADICTED_RATIO)}× the "
                    "threshold while the loss kept falling, which a run past the edge could not do: the quadratic "
                    "rule does not describe those probes (an adaptive preconditioner, or probe batches unlike the "
                    "training batches), so they are not counted as above.") if eos.contradicted else ""
    if not eos.crossed:
        peak = f"; it peaked at {fmt(eos.peak_ratio, 3)} of the threshold (step {eos.peak_step})" \
            if eos.peak_ratio is not None and not eos.contradicted else ""
        where = "Below the edge of stability at every probe" if not eos.contradicted else \
            "No edge-of-stability crossing established"
        return [Finding("edge_of_stability", "info", f"{where}: {eos.formula}{peak}.{contradicted}", eos.to_dict())]
    if eos.probes_above < MIN_EOS_PROBES:
        return [Finding("edge_of_stability", "info", f"η·sharpness above the stability threshold at only "
                        f"{eos.probes_above} of {len(eos.steps)} probes (step {eos.first_step}): too little to call "
                        f"a crossing (at least {MIN_EOS_PROBES} probes): {eos.formula}.{contradicted}", eos.to_dict())]
    stay = "to the end of the run" if eos.above_at_end and eos.episodes == 1 else \
        f"for at least {eos.duration} steps"
    text = (f"Edge of stability crossed at step {eos.first_step} and stayed above {stay} "
            f"({eos.probes_above} of {len(eos.steps)} probes above, peak {fmt(eos.peak_ratio, 3)}× the "
            f"threshold at step {eos.peak_step}): {eos.formula}.")
    if eos.uncertain:
        text += f" At {eos.uncertain} probe(s) the sharpness bound straddles the threshold."
    text += contradicted
    return [Finding("edge_of_stability", "note", text, eos.to_dict())]


def _smoothness(records: Records) -> list[Finding]:
    try:
        fit = smoothness_fit(records)
    except ConfigurationError as e:
        text = str(e)
        return [Finding("smoothness", "info", text[0].upper() + text[1:] + ".", {})]
    rho = _rank_text(fit.spearman, fit.points, "of sharpness with gradient norm")
    return [Finding("smoothness", "info",
                    f"(L0, L1)-smoothness: ‖∇²L‖ ≤ {fmt(fit.L0, 3)} + {fmt(fit.L1, 3)}·‖∇L‖ over {fit.points} "
                    f"probes{rho}.", fit.to_dict())]


def _saddle(records: Records) -> list[Finding]:
    probed = _steps_where(records, lambda r: isinstance(r.get("saddle"), Mapping))
    if not probed:
        return []
    flagged = _steps_where(records, lambda r: isinstance(r.get("saddle"), Mapping) and r["saddle"].get("flag") is True)
    unsure = _steps_where(records, lambda r: isinstance(r.get("saddle"), Mapping)
                          and r["saddle"].get("saddle") == "uncertain")
    data = {"flagged_steps": flagged, "uncertain_steps": unsure, "probes": len(probed)}
    if flagged:
        return [Finding("saddle", "note", f"Saddle point flagged at step(s) {fmt_steps(flagged)}: a small gradient "
                        "with certified negative curvature (‖∇L‖ ≤ ε_g and λ_min ≤ −ε_H).", data)]
    extra = f"; the test was inconclusive at {len(unsure)} of them" if unsure else ""
    return [Finding("saddle", "info", f"No saddle flagged at {len(probed)} probes{extra}.", data)]


def _median(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    """Median of the finite numbers under ``key``; NaN when there are none."""
    values = [float(x[key]) for x in rows if isinstance(x.get(key), (int, float)) and not isinstance(x.get(key), bool)
              and math.isfinite(x[key])]
    return float(np.median(values)) if values else math.nan


def _noise(records: Records) -> list[Finding]:
    rows = [r["noise"] for r in records if isinstance(r.get("noise"), Mapping)]
    med = _median(rows, "alpha_standardized")
    if not math.isfinite(med):
        return []
    err = _median(rows, "alpha_standardized_err")
    pooled = _median(rows, "alpha_pooled")
    het = [i for i, x in enumerate(rows) if x.get("scale_heterogeneity") is True]
    data = {"alpha_standardized_median": med, "alpha_pooled_median": pooled, "probes": len(rows),
            "scale_heterogeneity_probes": len(het)}
    out = []
    bound = med + HEAVY_TAIL_SIGMAS * (err if math.isfinite(err) else 0.0)
    if med < HEAVY_TAIL_ALPHA and bound < 2.0:
        out.append(Finding("noise", "note", f"Heavy-tailed gradient noise: standardized tail index α = "
                           f"{fmt_err(med, err)} (median over {len(rows)} probes; 2 is Gaussian).", data))
    else:
        out.append(Finding("noise", "info", f"Gradient noise close to Gaussian: standardized tail index α = "
                           f"{fmt_err(med, err)} (median over {len(rows)} probes).", data))
    if het:
        out.append(Finding("noise", "note", f"Scale heterogeneity at {len(het)} of {len(rows)} probes: the pooled "
                           f"α ({fmt(pooled, 3)}) is more than 0.2 below the standardized α ({fmt(med, 3)}), so the "
                           "low pooled index comes from coordinates of different scales, not from heavy tails.", data))
    return out


def _rmed(records: Records) -> list[Finding]:
    series = collect_series(records)
    out = []
    for path, what in (("rmed.rmed", "R_med"), ("precond.rmed", "R_med of P½HP½")):
        if path not in series:
            continue
        s = summarize(series[path])
        if s["first"] is None or s["finite"] < 2:
            continue
        ends = f"{fmt_err(s['first'], s['first_err'])} (step {s['first_step']}) to " \
               f"{fmt_err(s['last'], s['last_err'])} (step {s['last_step']})"
        unsure = s.get("unresolved_steps") or []
        if unresolved(s["first"], s["first_err"]) or unresolved(s["last"], s["last_err"]):
            out.append(Finding("rmed", "info", f"{what} went from {ends}, but its error exceeds "
                               f"{fmt(100 * UNRESOLVED_FRACTION)} % of the value at {len(unsure)} of {s['finite']} "
                               "probes: no trend is claimed (more HVPs per probe resolve it).", s))
            continue
        if s["finite"] < MIN_TREND_POINTS:
            out.append(Finding("rmed", "info", f"{what} went from {ends}{_rank_text(None, s['finite'], '')}; no "
                               "trend is claimed.", s))
            continue
        move = {"rising": "rose", "falling": "fell", "flat": "stayed flat", "mixed": "moved without a clear trend",
                None: "went"}[s["direction"]]
        ratio = f", ×{fmt(s['ratio'], 3)}" if s.get("ratio") else ""
        trend = _rank_text(s.get("trend"), s["finite"], "with step")
        out.append(Finding("rmed", "note" if s["direction"] in ("rising", "falling") else "info",
                           f"{what} {move} from {ends}{ratio}{trend}.", s))
    last = next((r["precond"] for r in reversed(records) if isinstance(r.get("precond"), Mapping)
                 and isinstance(r["precond"].get("rmed"), (int, float)) and isinstance(r["precond"].get("raw_rmed"),
                                                                                       (int, float))), None)
    if last is not None:
        verb = "lowers" if last["rmed"] < last["raw_rmed"] else "raises"
        out.append(Finding("rmed", "info", f"The optimizer's preconditioner {verb} R_med: {fmt(last['raw_rmed'], 3)} "
                           f"raw → {fmt(last['rmed'], 3)} preconditioned at the last probe.",
                           {"raw_rmed": last["raw_rmed"], "rmed": last["rmed"]}))
    return out


def _diagshare(records: Records) -> list[Finding]:
    last = next((r["diagshare"] for r in reversed(records) if isinstance(r.get("diagshare"), Mapping)
                 and isinstance(r["diagshare"].get("diagshare"), (int, float))), None)
    if last is None or not all(isinstance(last.get(k), (int, float)) for k in ("wigner", "ols")):
        return []
    d = last["diagshare"]
    where = "above both baselines" if d > max(last["wigner"], last["ols"]) else \
        "above the Wigner baseline only" if d > last["wigner"] else "at or below both baselines"
    return [Finding("diagshare", "info", f"Diagonal share {fmt_err(d, last.get('diagshare_err'))} at the last probe, "
                    f"{where} (Wigner {fmt(last['wigner'], 3)}, OLS {fmt(last['ols'], 3)} for d = {last.get('d')}, "
                    f"n = {last.get('n')}).", {k: last.get(k) for k in ("diagshare", "wigner", "ols", "d", "n")})]


def _unconverged(records: Records) -> list[Finding]:
    out = []
    names: dict[str, list[int]] = {}
    for r in records:
        for name, res in r.items():
            if isinstance(res, Mapping) and any(res.get(k) is False for k in CONVERGED_KEYS):
                names.setdefault(name, []).append(int(r.get("step", -1)))
    for name, steps in names.items():
        total = sum(isinstance(r.get(name), Mapping) for r in records)
        out.append(Finding("unconverged", "warning", f"{name} did not converge at {len(steps)} of {total} probes "
                           f"(step {fmt_steps(steps)}); those values are only as good as their reported bounds.",
                           {"metric": name, "steps": steps}))
    return out


def _failures(records: Records) -> list[Finding]:
    by_where: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        if isinstance(r.get("errors"), Mapping):
            for where, message in r["errors"].items():
                by_where.setdefault(where, []).append((int(r.get("step", -1)), str(message)))
    return [Finding("failures", "warning", f"{where} failed at {len(items)} probe(s) (step "
                    f"{fmt_steps([s for s, _ in items])}): {items[0][1]}",
                    {"where": where, "steps": [s for s, _ in items], "first_message": items[0][1]})
            for where, items in by_where.items()]


def _skipped(records: Records) -> list[Finding]:
    s = schedule_summary(records)
    if not s["skipped"]:
        return []
    why = ", ".join(s["skipped_by"])
    return [Finding("schedule", "warning", f"{s['skipped']} of {s['scheduled']} scheduled probes were skipped "
                    f"({why}): the trajectory is sampled more sparsely than asked; raise the budget or probe "
                    "less often (a larger every(n)) so the probes you schedule run.", s)]


def findings(records: Records, meta: Mapping[str, Any], counted: Records | None = None) -> list[Finding]:
    """Every finding about the run, warnings first, then notes, then the checks that found nothing.
    ``counted``: the records that carry the schedule's skip counts (default ``records``)."""
    out = _failures(records) + _skipped(records if counted is None else counted) + _unconverged(records) \
        + _edge(records, meta)
    for check in (_saddle, _noise, _rmed, _diagshare, _smoothness):
        out += check(records)
    order = {"warning": 0, "note": 1, "info": 2}
    return sorted(out, key=lambda f: order.get(f.level, 3))
