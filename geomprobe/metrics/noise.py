"""Gradient noise at a frozen iterate: tail indices, noise scale, signal-to-noise ratio (docs/metrics.md#noise).

The registered ``noise`` metric draws P ≥ 50 stochastic gradients ``g_p`` at the Landscape's parameters and
studies the noise ``ξ_p = g_p − ḡ``. The estimators of the tail index are public here too:
:func:`tail_index` (Mohammadi et al. 2015), :func:`hill_index` and the SαS sampler :func:`sample_sas`.

How the probe passes noise data: the keyword ``noise_data=`` (the registry lists the need as
``noise_batches``) takes an iterable of batches of the **training batch size**, e.g. P batches of a
shuffled DataLoader with ``drop_last=True`` or :func:`geomprobe.engine.persample.sample_minibatches`; each gives one
sample ``g_p`` (the first ``max_samples``, default 256, are read: a DataLoader that reshuffles gives fresh
batches at every probe). With ``noise_data=None`` the samples are per-example gradients on the Landscape's own probe
batches (``torch.func.vmap``, or micro-batches of one where vmap cannot run; ``method`` says which).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..engine.persample import GatheredGradients, MinibatchGradients, PerExampleGradients
from ..errors import ConfigurationError
from ..stats.gradient_noise import DEFAULT_MAX_ELEMENTS, NoiseStats, collect_noise, ratio, trace_estimates, with_error
from ..stats.tails import MIN_HILL_SAMPLES, hill_index, sample_sas, tail_index
from .registry import register

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "HETEROGENEITY_GAP",
    "MIN_NOISE_SAMPLES",
    "gradient_source",
    "hill_index",
    "noise",
    "noise_tail_indices",
    "sample_sas",
    "tail_index",
]

MIN_NOISE_SAMPLES = 50     # docs/metrics.md#noise: P >= 50 noise samples
DEFAULT_MAX_SAMPLES = 256  # a DataLoader given as noise_data is read this far, not for a whole epoch
HETEROGENEITY_GAP = 0.2    # alpha_standardized - alpha_pooled above this: scale heterogeneity, not heavy tails


def gradient_source(
    land: Any,
    noise_data: Any = None,
    *,
    min_samples: int,
    max_samples: int | None = None,
    chunk_size: int = 32,
    method: str = "auto",
) -> PerExampleGradients | MinibatchGradients | GatheredGradients:
    """The gradient samples a noise metric reads: minibatches of ``noise_data``, or per-example gradients of
    the Landscape's probe batches when it is None; a clear error when there are fewer than ``min_samples``.

    On a distributed Landscape each rank reads its own shard (or its own ``noise_data``) and every rank gets
    the union of all of them (:class:`~geomprobe.engine.persample.GatheredGradients`), so the statistics equal those
    of one process on the union and are identical on every rank; ``max_samples`` caps the union."""
    if noise_data is None:
        src: Any = PerExampleGradients(land, chunk_size=chunk_size, method=method, max_samples=max_samples)
        hint = "probe with more examples, or pass noise_data= (P batches of the training batch size)"
    else:
        batches = noise_data
        if max_samples is not None:
            batches = [b for _, b in zip(range(max_samples), iter(noise_data))]
        src = MinibatchGradients(land, batches)
        hint = "pass more batches in noise_data="
    reducer = getattr(land, "reducer", None)
    if reducer is not None and reducer.active:
        src = GatheredGradients(src, reducer, max_samples=max_samples)
    if len(src) < min_samples:
        raise ConfigurationError(
            f"gradient noise needs at least {min_samples} samples, got {len(src)} {src.source} gradients; {hint}"
        )
    return src


def noise_tail_indices(xi: torch.Tensor, *, partitions: int = 16, seed: int = 0) -> dict:
    """α̂ of a noise sample ``xi`` (P × m: samples × coordinates), pooled and per-coordinate standardized.

    Pooled: every nonzero entry in one sample, the tail index of the pooled law of all coordinates' noise.
    Standardized: each column divided by its standard deviation over samples first, so coordinates of
    different scales no longer look like a heavy tail; columns with zero variance carry no noise and are
    left out. ``gap`` = standardized − pooled; ``scale_heterogeneity`` when it exceeds
    :data:`HETEROGENEITY_GAP`: the pooled sample looks heavier-tailed than its standardized coordinates, so
    unequal scales, not heavy tails, made it so. (The paper's summary is sometimes read the other way round,
    pooled − standardized, yet its own example, 1.52 pooled for Gaussians of log-normal scales, has pooled
    below standardized; the sign here is the one that flags that example.)

    What the pooled estimate is comparable with: Simsekli et al. (2019) pool the coordinates of the noise
    and treat them as i.i.d. draws of one law; ``alpha_pooled`` estimates the tail index of that same
    pooled law, and equals their number where that assumption holds. The blocks are drawn at random
    (``blocking="random"``, :func:`tail_index` with ``partitions`` > 1), so the result depends only on the
    multiset of values: the same for the matrix, its transpose, or any order of rows and columns. Blocks
    of consecutive values, as a plain implementation cuts them, are not: on a ReLU MLP's noise consecutive
    coordinates of one sample (row-major) gave 0.56 and consecutive samples of one coordinate
    (column-major) 2.37, because sums of correlated coordinates grow like a heavy tail's; random blocks
    hold neither order's correlation (tests/test_noise_tail.py shows it with a known marginal law).
    Exact zeros (coordinates without noise: dead units) have no scale and are dropped: ``zeros_pooled``
    counts them among ``entries``, so α̂ describes the ``values`` nonzero entries only.

    Intervals: ``alpha_pooled_lo``/``_hi`` and ``alpha_standardized_lo``/``_hi`` are the studentized
    95 % intervals of :func:`tail_index`; ``*_err`` their delta-method half-widths over 1.96.

    >>> g = torch.Generator().manual_seed(0)
    >>> scales = torch.exp(torch.randn(400, generator=g, dtype=torch.float64))    # log-normal, sd 1
    >>> xi = torch.randn(250, 400, generator=g, dtype=torch.float64) * scales
    >>> out = noise_tail_indices(xi)
    >>> round(out["alpha_pooled"], 1), round(out["alpha_standardized"], 1), out["scale_heterogeneity"]
    (1.5, 2.0, True)
    """
    if xi.dim() != 2:
        raise ConfigurationError(f"noise_tail_indices takes a P x m matrix, got shape {tuple(xi.shape)}")
    xi = xi.detach().double().cpu()
    pooled = tail_index(xi.reshape(-1), partitions=partitions, seed=seed)
    sd = xi.std(0)
    live = sd > 0
    standardized = tail_index((xi[:, live] / sd[live]).reshape(-1), partitions=partitions, seed=seed + 1)
    a_p, a_s = pooled["alpha"], standardized["alpha"]
    gap = a_s - a_p if a_p is not None and a_s is not None else None
    gap_err = None
    if gap is not None and pooled["alpha_err"] is not None and standardized["alpha_err"] is not None:
        gap_err = (pooled["alpha_err"] ** 2 + standardized["alpha_err"] ** 2) ** 0.5
    return {
        "alpha_pooled": a_p,
        "alpha_pooled_err": pooled["alpha_err"],
        "alpha_pooled_lo": pooled["alpha_lo"],
        "alpha_pooled_hi": pooled["alpha_hi"],
        "alpha_standardized": a_s,
        "alpha_standardized_err": standardized["alpha_err"],
        "alpha_standardized_lo": standardized["alpha_lo"],
        "alpha_standardized_hi": standardized["alpha_hi"],
        "gap": gap,
        "gap_err": gap_err,
        "scale_heterogeneity": bool(gap is not None and gap > HETEROGENEITY_GAP),
        "values": pooled["n"],
        "entries": int(xi.numel()),
        "zeros_pooled": pooled["zeros"],
        "blocking": pooled["order"],
        "k1": pooled["k1"],
    }


def _block_tail_entry(sub: torch.Tensor, partitions: int, seed: int) -> dict[str, Any]:
    """One block's tail indices from its columns ``sub`` of the noise sample (host work), or why there are none."""
    entry: dict[str, Any] = {"coordinates": sub.shape[1]}
    try:
        t = noise_tail_indices(sub, partitions=partitions, seed=seed)
        entry.update(alpha=t["alpha_pooled"], alpha_err=t["alpha_pooled_err"],
                     alpha_standardized=t["alpha_standardized"],
                     alpha_standardized_err=t["alpha_standardized_err"],
                     scale_heterogeneity=t["scale_heterogeneity"])
    except ConfigurationError as e:  # a block too small, or without noise: say why, keep the others
        entry.update(alpha=None, alpha_err=None, alpha_standardized=None, alpha_standardized_err=None,
                     scale_heterogeneity=None, note=str(e))
    return entry


def _block_columns(coords: np.ndarray, blocks: Any) -> list[tuple[int, int]]:
    """Each block's columns of the noise sample: the contiguous run of the sorted ``coords`` inside it."""
    return [tuple(int(i) for i in np.searchsorted(coords, [b.start, b.stop], side="left")) for b in blocks]


def _block_tail_indices(sub: torch.Tensor, coords: np.ndarray, blocks: Any, partitions: int,
                        seed: int) -> dict[str, dict]:
    """Per block: the tail indices of its coordinates' noise (block ``j`` seeded ``seed + 2 + 2j``), from the
    host copy ``sub`` of the noise sample and its sorted coordinates ``coords``."""
    return {b.name: _block_tail_entry(sub[:, lo:hi], partitions, seed + 2 + 2 * j)
            for j, (b, (lo, hi)) in enumerate(zip(blocks, _block_columns(coords, blocks)))}


def _block_tails(stats: NoiseStats, partitions: int, seed: int,
                 tails: dict[str, dict] | None = None) -> dict[str, dict]:
    """Per block: the tail indices of its coordinates' noise (``tails`` when already computed, from
    :func:`_block_tail_indices`) and its noise trace with a jackknife error.

    What they read is brought to the host once (the noise sample, its sorted coordinates, the per-block
    squared norms), not once per block: each copy from the device waits for it, and a GPT-2 probe made
    ~150 of them here."""
    if tails is None:
        tails = _block_tail_indices(stats.sub.detach().double().cpu(), stats.coords.cpu().numpy(), stats.blocks,
                                    partitions, seed)
    raw = stats.views["raw"]
    view = replace(raw, block_sq=raw.block_sq.detach().cpu())
    out: dict[str, dict] = {}
    for j, b in enumerate(stats.blocks):
        entry = dict(tails[b.name])
        tr = trace_estimates(stats, view, block=j)
        entry["trace_cov"], entry["trace_cov_err"] = with_error(tr["trace"], tr["trace_R"])
        out[b.name] = entry
    return out


TAIL_WORKERS = 4  # threads for the tail indices at most (one per spare core, so never more than the host has)


class _TailsBeside:
    """The tail indices computed in worker threads while the second pass over the gradients runs: they read
    only the tail sample, complete after the first pass, and are host work (numpy's shuffles, about 1.2 s for
    GPT-2 124M's 148 blocks on one core) that would otherwise wait for the gradients, or make them wait.

    Every estimate is one independent job, seeded as before (the pooled sample ``seed``, block ``j``
    ``seed + 2 + 2j``), so the results do not depend on the number of workers or their order; numpy's
    shuffles, the bulk of the work, release the interpreter lock, so the jobs run side by side and beside the
    second pass. Workers: one per core beyond the one driving the gradients, at most :data:`TAIL_WORKERS`."""

    def __init__(self, blocks: Any, partitions: int, seed: int, workers: int | None = None):
        self.blocks, self.partitions, self.seed = list(blocks), partitions, seed
        if workers is None:
            workers = max(1, min(TAIL_WORKERS, (os.cpu_count() or 1) - 1))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="geomprobe-noise-tails")
        self.pooled: Future | None = None
        self.per_block: list[Future] = []

    def start(self, sub: torch.Tensor, coords: torch.Tensor) -> None:
        """``collect_noise``'s ``on_tail_sample``: the sample's host copies (one read), then the jobs, the
        largest first so that the workers finish together."""
        sub_h, coords_h = sub.detach().double().cpu(), coords.cpu().numpy()
        self.pooled = self.pool.submit(noise_tail_indices, sub_h, partitions=self.partitions, seed=self.seed)
        cols = _block_columns(coords_h, self.blocks)
        order = sorted(range(len(self.blocks)), key=lambda j: cols[j][0] - cols[j][1])
        jobs = {j: self.pool.submit(_block_tail_entry, sub_h[:, cols[j][0]:cols[j][1]], self.partitions,
                                    self.seed + 2 + 2 * j) for j in order}
        self.per_block = [jobs[j] for j in range(len(self.blocks))]

    def result(self) -> tuple[dict, dict[str, dict]]:
        """The pooled tail indices and each block's, waiting for the jobs (an error of the pooled estimate
        is raised here)."""
        assert self.pooled is not None, "collect_noise did not report its tail sample"
        return self.pooled.result(), {b.name: f.result() for b, f in zip(self.blocks, self.per_block)}

    def close(self) -> None:
        # never waits: after a failure elsewhere the jobs under way finish alone and their results are dropped
        self.pool.shutdown(wait=False, cancel_futures=True)


@register(
    "noise",
    cost="no HVPs; P >= 50 gradients (one per example or per noise batch), twice when P*d > max_elements",
    needs=("noise_batches",),
)
def noise(
    land: Any,
    *,
    noise_data: Any = None,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    min_samples: int = MIN_NOISE_SAMPLES,
    dataset_size: int | None = None,
    method: str = "auto",
    chunk_size: int = 32,
    tail_values: int = 2**19,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    partitions: int = 16,
    hill_k: int | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """Statistics of the gradient noise ``ξ_p = g_p − ḡ`` over P ≥ 50 samples at the frozen parameters.

    Samples: ``noise_data`` batches (one gradient each, all of the training batch size B), or per-example
    gradients of the probe batches (B = 1) when it is None. ``max_samples`` caps P (the first batches of
    ``noise_data``, the first examples of the probe batches; None: all of them). Estimates:

    - Tail index α̂ (:func:`tail_index`) on a fixed random subset of coordinates (``tail_values`` values at
      most, so memory stays ``P × m`` whatever d): ``alpha_pooled`` over all, ``alpha_standardized`` after
      dividing each coordinate by its std, per block in ``blocks``; ``scale_heterogeneity`` when
      standardized − pooled (``gap``) > 0.2: pooled Gaussian coordinates of unequal scales mimic a heavy
      tail (docs/metrics.md#noise; see :func:`noise_tail_indices` for the sign).
    - ``hill_alpha``: Hill's exponent of the noise norms ``‖ξ_p‖`` with a bootstrap interval.
    - ``trace_cov = tr Cov(g_p)`` (divisor P−1, unbiased) and ``grad_norm_sq = ‖ḡ‖² − trace_cov/P``, the
      unbiased ``‖G‖²``.
    - ``noise_scale = tr Σ / ‖G‖²`` in examples (McCandlish et al. 2018, "An empirical model of large-batch
      training", B_simple), with the per-example ``tr Σ = B · trace_cov`` (times ``(N−1)/(N−B)``, the
      finite-population correction, when ``dataset_size`` N is given for minibatches drawn without
      replacement). None when ``grad_norm_sq ≤ 0`` (the mean gradient is lost in the noise).
    - ``snr = ‖G‖² / trace_cov``: the signal-to-noise ratio of one sample (one example or one batch).

    Errors: α̂ from :func:`tail_index`; ``*_err`` of the moments and ratios by a delete-a-group jackknife
    over 20 groups of samples (or over the held groups when P·d > ``max_elements``). ``mean_grad_rel_diff``
    (per-example source) compares ḡ with the Landscape's gradient: it should be ~1e-7 or less; a large
    value means the loss is not a per-example mean (e.g. ``reduction="sum"``) or examples interact (BatchNorm
    in train mode), and per-example gradients are not the noise of the training gradient.

    Cost: no HVPs; P gradients (two passes when ``P·d > max_elements``), counted in ``gradients``.
    """
    src = gradient_source(land, noise_data, min_samples=min_samples, max_samples=max_samples,
                          chunk_size=chunk_size, method=method)
    gen = torch.Generator().manual_seed(seed)
    beside = _TailsBeside(land.blocks, partitions, seed)
    try:
        # this metric reads neither the moments of the covariance nor per-coordinate variances: skipping them
        # leaves the second pass streaming, with nothing held
        stats = collect_noise(src, land.blocks, tail_values=tail_values, max_elements=max_elements, generator=gen,
                              device=land.device, moments=False, coordinate_variance=False,
                              on_tail_sample=beside.start)
        raw = stats.views["raw"]
        if not float(raw.sq.sum()) > 0:
            raise ConfigurationError(
                f"all {stats.P} gradient samples are equal: there is no noise to measure (identical examples or "
                "batches, or parameters the loss does not depend on)"
            )
        tails, block_tail_indices = beside.result()
    finally:
        beside.close()
    norms = raw.sq.sqrt()
    norms = norms[norms > 0]  # a sample exactly at the mean has no direction, and Hill needs logs
    if norms.numel() >= MIN_HILL_SAMPLES:
        hill = hill_index(norms, hill_k, n_boot=n_boot, seed=seed)
    else:
        hill = {"alpha": None, "alpha_err": None, "alpha_lo": None, "alpha_hi": None, "k": None}

    tr = trace_estimates(stats, raw)
    B = src.batch_size
    fpc = 1.0
    if dataset_size is not None and src.source == "minibatch":
        if dataset_size <= B:
            raise ConfigurationError(f"dataset_size must exceed the batch size {B}, got {dataset_size}")
        fpc = (dataset_size - 1) / (dataset_size - B)
    factor = B * fpc
    scale_R = [ratio(factor * t, g) for t, g in zip(tr["trace_R"], tr["g2_R"])]
    snr_R = [ratio(g, t) for t, g in zip(tr["trace_R"], tr["g2_R"])]
    noise_scale, noise_scale_err = with_error(ratio(factor * tr["trace"], tr["g2"]), scale_R)
    snr, snr_err = with_error(ratio(tr["g2"], tr["trace"]), snr_R)
    trace_cov, trace_cov_err = with_error(tr["trace"], tr["trace_R"])
    g2, g2_err = with_error(tr["g2"], tr["g2_R"])

    out: dict[str, Any] = {
        "source": src.source,
        "method": src.method,
        "fallback_reason": src.fallback_reason,
        "samples": stats.P,
        "batch_size": B,
        "dim": stats.d,
        "coordinates": int(stats.coords.numel()),
        **tails,
        "hill_alpha": hill["alpha"],
        "hill_alpha_err": hill["alpha_err"],
        "hill_alpha_lo": hill["alpha_lo"],
        "hill_alpha_hi": hill["alpha_hi"],
        "hill_k": hill["k"],
        "trace_cov": trace_cov,
        "trace_cov_err": trace_cov_err,
        "grad_norm_sq": g2,
        "grad_norm_sq_err": g2_err,
        "noise_scale": noise_scale,
        "noise_scale_err": noise_scale_err,
        "snr": snr,
        "snr_err": snr_err,
    }
    if src.source == "per-example":
        ref = land.grad.detach().to(stats.mean)
        diff = float((stats.mean - ref).norm()) / max(float(ref.norm()), 1e-300)
        out["mean_grad_rel_diff"] = diff
    out.update(
        blocks=_block_tails(stats, partitions, seed, block_tail_indices),
        exact=stats.exact,
        passes=stats.passes,
        gradients=stats.P * stats.passes,
        hvps=0,
    )
    return out
