"""Can this model be probed? Checks behind ``geomprobe doctor``, each with what to do about a problem.

:func:`diagnose` runs the model of a :class:`~geomprobe.load.spec.ProbeSpec` through what a probe needs and
returns one :class:`Check` per question, with status ``OK``, ``WARN`` (works, but read the note), ``FAIL``
(probing will not work until fixed) or ``SKIP`` (not reached because an earlier check failed):

* parameters: trainable count, dtype, device (half precision loses digits in double backward);
* probe data and loss: the batches resolve and the loss is a finite scalar;
* double backward: one batched Hessian-vector product runs and is symmetric, ``u.Hv = v.Hu``;
* attention: scaled-dot-product attention calls and which attention the memory plan builds graphs with
  (torch's math kernel, which keeps the probabilities, or torch's fused kernel with geomprobe's double
  backward, which recomputes them: :mod:`geomprobe.engine.attention_plan`), and Hugging Face
  flash-attention implementations;
* BatchNorm and dropout: present or not, and what the mode does to them;
* per-example gradients: ``torch.func.vmap`` over the loss, or the micro-batch fallback;
* optimizer: whether ``precond`` can read the preconditioner of the spec's optimizer;
* threads: ``OMP_NUM_THREADS`` unset on a CPU with few cores or busy ones (:func:`threads_check`).

>>> import torch
>>> from torch import nn
>>> from geomprobe.load.spec import ProbeSpec
>>> X = torch.randn(8, 3)
>>> spec = ProbeSpec(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), nn.CrossEntropyLoss(),
...                  (X, torch.zeros(8, dtype=torch.long)))
>>> sorted({c.status for c in diagnose(spec) if c.name != "threads"})  # threads depend on this machine
['OK']
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .engine.landscape import Landscape, unwrap_model
from .engine.persample import PerExampleGradients
from .engine.probedata import draw_probe_batches
from .engine.state import frozen
from .errors import GeomprobeError, UnsupportedOperationError
from .load.spec import ProbeSpec

__all__ = ["Check", "diagnose", "threads_check", "STATUSES", "FEW_CORES"]

STATUSES = ("OK", "WARN", "FAIL", "SKIP")
# |u.Hv - v.Hu| relative to |u||Hv| + |v||Hu| above this many machine epsilons means a second derivative is
# wrong somewhere (exact HVPs are symmetric up to rounding in sums over d terms).
SYMMETRY_EPS_FACTOR = 1e3
_HALF = (torch.float16, torch.bfloat16)
# At most this many cores, or a 1-minute load average above half the cores, and OMP_NUM_THREADS unset: warn.
# Measured on 2 shared cores: an HVP of a 10k-parameter MLP took 2.1 ms with one thread, 30-57 ms with two.
FEW_CORES = 4
_PRECOND_KNOWN = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


@dataclass
class Check:
    """One answer: ``name`` of the check, ``status`` in :data:`STATUSES`, what was found, what to do."""

    name: str
    status: str
    detail: str
    advice: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


def _brief(e: BaseException) -> str:
    """The finding of one of geomprobe's own messages, which say what was found, then "; " and what to do."""
    text = " ".join(str(e).split())
    return text.split("; ")[0][:240]


class _AttentionCalls(TorchFunctionMode):
    """Counts calls of torch functions with 'attention' in their name during a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if "attention" in name:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _parameters(model: nn.Module) -> Check:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return Check("parameters", "FAIL", f"{len(params)} parameter tensors, none requires grad",
                     "unfreeze what to measure (requires_grad=True); the Hessian is over trainable parameters")
    n, n_train = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in trainable})
    devices = sorted({str(p.device) for p in trainable})
    detail = f"{n_train:,} trainable of {n:,}; {', '.join(dtypes)} on {', '.join(devices)}"
    if any(p.dtype in _HALF for p in trainable):
        return Check("parameters", "WARN", detail,
                     "half precision loses most digits in double backward: probe a float32 copy (model.float())")
    if len(devices) > 1:
        return Check("parameters", "WARN", detail, "parameters on several devices: probe a single-device copy")
    return Check("parameters", "OK", detail)


def _batchnorm(model: nn.Module, mode: str, min_batch: int | None) -> Check:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return Check("BatchNorm", "OK", "none")
    detail = f"{len(bns)} layer(s); mode {mode}: " + (
        "running statistics (the function the deployed model computes)" if mode == "eval"
        else "batch statistics (the function the optimizer saw)"
    )
    if mode == "train" and min_batch == 1:
        return Check("BatchNorm", "FAIL", detail + ", but a probe batch has one example",
                     "use probe batches of several examples, or --mode eval")
    return Check("BatchNorm", "WARN", detail,
                 "the two modes have different Hessians: choose --mode eval or --mode train deliberately")


def _dropout(model: nn.Module, mode: str) -> Check:
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not drops:
        return Check("dropout", "OK", "none active")
    if mode == "eval":
        return Check("dropout", "OK", f"{len(drops)} layer(s), off in eval mode")
    return Check("dropout", "WARN",
                 f"{len(drops)} layer(s), on in train mode with masks frozen (seeded) per probe batch",
                 "each probe measures one fixed thinned network; --mode eval measures the full one")


def _optimizer(spec: ProbeSpec) -> Check:
    if spec.optimizer_factory is None:
        return Check("optimizer", "OK", "no optimizer_factory in the spec",
                     "add optimizer_factory for the precond metric on training checkpoints")
    try:
        opt = spec.build_optimizer()
    except GeomprobeError as e:
        return Check("optimizer", "FAIL", str(e), "fix optimizer_factory: it is called as optimizer_factory(model)")
    name = type(opt).__name__
    if isinstance(opt, _PRECOND_KNOWN) or callable(getattr(opt, "preconditioner", None)):
        return Check("optimizer", "OK", f"{name}: precond reads its preconditioner from checkpoint state")
    return Check("optimizer", "WARN", f"{name}: precond knows no preconditioner for it",
                 "precond supports SGD, Adam, AdamW, RMSprop, Adagrad and optimizers with preconditioner()")


def _attention(model: nn.Module, land: Landscape | None, mode: str, seed: int) -> tuple[Check, bool]:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith("flash"):
        return Check("attention", "FAIL", f"Hugging Face attn_implementation={impl!r}",
                     "flash-attention kernels have no double backward: load the model with "
                     "attn_implementation='sdpa' or 'eager'"), True
    modules = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    calls: dict[str, int] = {}
    if land is not None:
        recorder = _AttentionCalls()
        with frozen(land.model, mode, seed=seed), recorder:
            land.loss_on(land.batches[0])
        calls = recorder.calls
    if not calls and not modules:
        return Check("attention", "OK", "no attention layers or calls"), False
    found = ", ".join(f"{n} x{c}" for n, c in sorted(calls.items())) or f"{len(modules)} MultiheadAttention"
    return Check("attention", "OK", f"{found} per forward", "torch's math kernel keeps the (T x T) probabilities in "
                 "the graph; the memory plan switches to geomprobe's recomputing attention where torch's does not "
                 "fit or would rebuild graphs at every HVP (in Python, recompute_attention=True / False forces "
                 "either)"), True


def _attention_choice(check: Check, land: Landscape) -> None:
    """Add to the attention check which attention the Landscape's graphs were built with, and why."""
    if check.status != "OK" or check.detail.startswith("no attention"):
        return
    kind = "geomprobe's recomputing attention" if land.recompute_attention else "torch's math kernel"
    check.detail += f"; graphs built with {kind} ({land.attention.get('reason')})"


def _double_backward(land: Landscape, seed: int, attention: bool) -> Check:
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(2, land.dim, generator=g, dtype=torch.float64).to(land.dtype)
    V = V / V.norm(dim=1, keepdim=True)
    advice = "replace that layer, or in Python use hvp_method='finite-difference' (approximate, flagged)"
    if attention:
        advice += "; attention must run with the math kernel or attn_implementation='eager'"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            HV = land.hvp(V)
        except UnsupportedOperationError as e:
            return Check("double backward", "FAIL", _brief(e), advice)
        except Exception as e:  # any other failure of the HVP is as fatal for probing
            return Check("double backward", "FAIL", _line(e), advice)
    if not bool(torch.isfinite(HV).all()):
        return Check("double backward", "FAIL", "the Hessian-vector product has non-finite entries",
                     "check the loss at these parameters (a NaN in the second derivative)")
    u, v, Hu, Hv = V[0].double(), V[1].double(), HV[0].double(), HV[1].double()
    asym = float((u @ Hv - v @ Hu).abs() / (Hv.norm() + Hu.norm() + torch.finfo(torch.float64).tiny))
    limit = SYMMETRY_EPS_FACTOR * torch.finfo(land.dtype).eps
    if asym > limit:
        return Check("double backward", "FAIL", f"HVPs are not symmetric (relative |u.Hv - v.Hu| = {asym:.1e})",
                     "a custom autograd Function has a wrong or missing double backward: fix or replace it")
    fallback = [w for w in caught if "batched HVPs" in str(w.message)]
    if fallback:
        return Check("double backward", "WARN", "exact HVPs work, one vector at a time (no batching rule)",
                     "probes are slower; lower the number of vectors or accept the cost")
    return Check("double backward", "OK", f"exact HVPs work, batched (symmetry {asym:.0e})")


def _per_example(land: Landscape, spec: ProbeSpec) -> Check:
    fallback = "the spec's noise_data gives minibatch gradient noise instead" if spec.noise_data is not None else ""
    try:
        src = PerExampleGradients(land, chunk_size=2, max_samples=2)
        next(iter(src))
    except Exception as e:
        found = _brief(e) if isinstance(e, GeomprobeError) else _line(e)
        return Check("per-example gradients", "OK" if fallback else "WARN", f"fail: {found}",
                     fallback or "the noise metric needs noise_data (training-size batches) in the spec")
    if src.method == "vmap":
        return Check("per-example gradients", "OK", "torch.func vmap over the loss works")
    return Check("per-example gradients", "WARN", f"micro-batches of one example ({src.fallback_reason})",
                 "the noise metric is slower; " + (fallback or "or give noise_data in the spec"))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use, not the machine's
    except AttributeError:  # pragma: no cover - macOS and Windows
        return os.cpu_count() or 1


def threads_check(environ: Mapping[str, str] | None = None, cores: int | None = None, load: float | None = None,
                  device: str = "cpu") -> Check:
    """Whether the thread setting suits the CPU: ``OMP_NUM_THREADS`` unset with at most :data:`FEW_CORES`
    cores, or with a 1-minute load average (``load``, default ``os.getloadavg``) above half the cores, is a
    WARN; so is a value that is not a positive integer or exceeds the cores. Costs nothing (no HVP).

    >>> threads_check({}, cores=2, load=0.0).status, threads_check({"OMP_NUM_THREADS": "1"}, cores=2).status
    ('WARN', 'OK')
    >>> threads_check({}, cores=32, load=1.0).status, threads_check({}, cores=32, load=30.0).status
    ('OK', 'WARN')
    """
    environ = os.environ if environ is None else environ
    cores = _cores() if cores is None else int(cores)
    if load is None and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
    threads = torch.get_num_threads()
    value = environ.get("OMP_NUM_THREADS")
    advice = "export OMP_NUM_THREADS=1 (or the cores this job may use) before training and probing"
    if device != "cpu":
        return Check("threads", "OK", f"the model is on {device}; torch uses {threads} CPU thread(s)")
    if value is not None:
        n = int(value) if value.strip().isdigit() else 0
        if n < 1:
            return Check("threads", "WARN", f"OMP_NUM_THREADS={value!r} is not a positive integer", advice)
        if n > cores:
            return Check("threads", "WARN", f"OMP_NUM_THREADS={n} is more than the {cores} core(s) this process "
                                            "may use: threads wait on each other", advice)
        return Check("threads", "OK", f"OMP_NUM_THREADS={n}; torch uses {threads} thread(s) on {cores} core(s)")
    busy = load is not None and load > 0.5 * cores
    if cores <= FEW_CORES or busy:
        why = f" under a load of {load:.1f} from other processes" if busy else ""
        return Check("threads", "WARN", f"OMP_NUM_THREADS is unset: torch runs {threads} thread(s) on {cores} "
                                        f"core(s){why}, and shared cores make every HVP wait (over 10x slower, measured)",
                     advice)
    return Check("threads", "OK", f"OMP_NUM_THREADS unset; {cores} cores, load {load if load is not None else '?'}")


def diagnose(spec: ProbeSpec, *, mode: str = "eval", seed: int = 0, samples: int | None = None) -> list[Check]:
    """Run every check on ``spec``'s model at its current weights; the model comes back unchanged."""
    model = unwrap_model(spec.model)
    checks = [_parameters(model)]
    land: Landscape | None = None
    batches: list[Any] | None = None
    try:
        batches, _ = draw_probe_batches(spec.probe_data, samples=samples, seed=seed)
        land0 = Landscape(model, spec.loss_fn, batches, mode=mode, seed=seed, hvp_method="finite-difference")
        checks.append(Check("loss", "OK", f"{land0.loss:.4g} on {land0.n_samples} samples in {len(batches)} "
                                          f"batch(es), gradient norm {float(land0.grad.norm()):.3g} ({mode} mode)"))
    except Exception as e:
        checks.append(Check("loss", "FAIL", _line(e), "fix loss_fn / probe_data in the spec (see the message)"))
        land0 = None
    attention, has_attention = _attention(model, land0, mode, seed)
    if land0 is not None:
        try:
            land = Landscape(model, spec.loss_fn, batches, mode=mode, seed=seed)
        except UnsupportedOperationError as e:
            checks.append(Check("double backward", "FAIL", _brief(e),
                                "replace that layer, or in Python use hvp_method='finite-difference'"))
        else:
            checks.append(_double_backward(land, seed, has_attention))
            _attention_choice(attention, land)
            land.close()
        checks.append(attention)
        checks.append(_per_example(land0, spec))
    else:
        checks.append(Check("double backward", "SKIP", "not reached: the loss failed"))
        checks.append(attention)  # the static part (a flash-attention implementation) is still known
        checks.append(Check("per-example gradients", "SKIP", "not reached: the loss failed"))
    min_batch = min(land0.batch_sizes) if land0 is not None else None
    checks.append(_batchnorm(model, mode, min_batch))
    checks.append(_dropout(model, mode))
    checks.append(_optimizer(spec))
    params = next(model.parameters(), None)
    checks.append(threads_check(device=params.device.type if params is not None else "cpu"))
    return checks
