"""GeometryProbe: the hook that measures geometry at sampled iterates of a user's own training loop.

>>> import torch, tempfile
>>> from torch import nn
>>> import geomprobe as gp
>>> g = torch.Generator().manual_seed(0)
>>> X, y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
>>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with tempfile.TemporaryDirectory() as tmp:
...     with gp.GeometryProbe(model, nn.CrossEntropyLoss(), (X, y), schedule=gp.every(5),
...                           run_dir=tmp + "/run") as probe:
...         _ = probe.attach(opt)                 # probes step 0 now, then every 5 optimizer steps
...         for _ in range(10):                   # the user's loop, unchanged
...             opt.zero_grad(); nn.functional.cross_entropy(model(X), y).backward(); opt.step()
...     [r["step"] for r in gp.RunReader(tmp + "/run").records]
[0, 5, 10]
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..engine.autodiff.normdouble import compile_seconds
from ..engine.distributed import make_reducer
from ..engine.landscape import Landscape, unwrap_model
from ..engine.loss import loss_reduction
from ..engine.memory_plan import DEFAULT_CHUNK_SIZE, DEFAULT_PEAK_RATIO
from ..engine.memory_readings import read_training_peak
from ..engine.paramspace import ParamSpace, select_parameters
from ..engine.probedata import draw_probe_batches
from ..engine.state import rng_preserved
from ..errors import ConfigurationError, OptimizerStateError
from ..linalg.host_blocks import keep_released
from ..linalg.pinned_memory import release_pool
from ..linalg.ritz import prefetch_solver
from ..metrics import registry
from ..metrics.ritz_vectors import RITZ_READERS, drop_unformed
from ..runs.writer import RunWriter
from .allowance import OverAllowance, budgeted, settle, watch
from .last_update import LastUpdate, wants_last_update
from .memory_budget import probe_budget
from .metric_order import providers, run_order
from .metric_spec import resolve_metrics
from .oom_ladder import is_oom, step_down
from .options import check_probe_options, check_sharded_metrics
from .probe_cost import ProbeCost
from .progress import ProbeProgress, ProgressCallback, plan_probe, resolve_progress
from .resume_check import check_resumable, probe_policy
from .run_folder import last_step, refuse_existing, storable, unwritten_message, write_pending
from .schedule import Schedule, budget, every
from .skips import SkipCounter, budgets, open_ended
from .summary import resolve_summary
from .warm_start import WarmStart

__all__ = ["GeometryProbe", "DEFAULT_METRICS"]

DEFAULT_METRICS = ("spectrum",)


class GeometryProbe:
    """Measures loss geometry at sampled steps of a training loop and writes each probe to a run log.

    Args:
        model: the network being trained (DDP and ``torch.compile`` wrappers are unwrapped).
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)`` (see :class:`Landscape`).
        probe_data: a DataLoader (``probe_samples`` samples are drawn from its dataset once, seeded), an
            ``(inputs, targets)`` pair or a list of batches. Every probe measures the same fixed batches.
        metrics: metric names, ``"NAME:key=value,..."`` strings, dicts with ``"name"`` and options, or a dict
            mapping names to their options (``{"spectrum": {"k": 3}}``); options are checked against each
            metric's signature at construction (:mod:`.metric_spec`).
        schedule: when to probe (default ``every(100) | budget(0.05)``); the step counts optimizer steps. A
            budget defers every probe, the first included, until its cost fits: before any probe ran, the cost
            predicted from :attr:`cost_plan` and the timed training steps (:mod:`.probe_cost`), so a budget
            never probes step 0 (no step timed yet); ``at([0]) | ...`` measures it outside the budget.
        run_dir: where the run log goes (``meta.json`` + ``records.jsonl``); ``None`` keeps records in memory.
        mode: the Landscape's mode policy, ``"eval"`` or ``"train"``.
        optimizer: for preconditioned metrics; :meth:`attach` sets it too.
        noise_data: batches of the training batch size for gradient-noise metrics.
        params, group_by, chunk_size, hvp_method, max_batches, loss_form, reduction: passed to :class:`Landscape`.
        recompute_attention: passed to :class:`Landscape`; ``None`` (default): each probe's memory plan chooses
            between torch's attention and geomprobe's recomputing one (:mod:`geomprobe.engine.attention_plan`).
        micro_batch_size: measure the probe batches in pieces of this many samples, keeping one first-order
            graph and rebuilding the others per HVP (the same Hessian, less memory, slower probes).
        basis_device: where Lanczos bases live (``"cpu"``: host memory), for the metrics that run Lanczos.
            Both are also reached automatically, one after the other, when a probe runs out of memory (and
            then, on a CUDA model, host vectors: ``vector_device`` below).
        vector_device: passed to :class:`Landscape`: ``"cpu"`` keeps every HVP vector, the gradient and
            ``spectrum``'s Lanczos vectors in host memory, streamed through the double backward
            (:mod:`geomprobe.engine.host_stream`); ``None`` (default): the memory plan takes host vectors when
            nothing else fits its budget (recorded as ``vectors`` in ``cost.memory_plan``).
        memory_plan: plan each probe's memory before it runs (:mod:`geomprobe.engine.memory_plan`): settings
            left at ``None`` (``chunk_size``, ``micro_batch_size``, ``basis_device``, and the bytes per-example
            gradients take at once) are chosen so that the probe's peak stays within ``peak_ratio`` times the
            training step's peak, read from ``torch.cuda.max_memory_allocated()`` over the steps since the last
            probe (the probe resets that counter when it ends, so the next interval is training alone), and
            within free memory and ``memory_cap`` (bytes of device memory in use, absolute). The plan is in
            each record's ``cost.memory_plan`` and the first one in the run's metadata. Out-of-memory
            failures still shrink the settings for later probes (recorded as ``"oom-ladder"``).
        seed: seeds probe-data sampling, dropout masks in train mode and every metric's random vectors.
        force / resume: replace or append to an existing run folder. ``force`` leaves the old run as it was
            until a probe has measured something, then swaps in the new run in one step; ``resume`` refuses
            a run measured with other metrics, options, mode, probe data or seed (:mod:`.resume_check`).
        tensorboard: a log folder for TensorBoard scalars (needs tensorboard installed).
        meta: extra JSON-ready metadata for the run.
        clock: the clock probe time is measured with (the schedule's budget sees the same seconds).
        annotate: called at each probe; its JSON-ready dict is added to the record (e.g. backprops so far,
            an epoch number, a validation accuracy the loop keeps).
        process_group: under torch.distributed, each rank passes its shard of the probe data and every rank
            measures the union (see :class:`Landscape`); only rank 0 writes ``run_dir`` and TensorBoard, the
            other ranks keep the same records in :attr:`records`. Every rank must call the probe alike.
        warm_start: ``"auto"`` (default): Lanczos (``spectrum``) starts from the previous probe's extreme Ritz
            vectors, kept on the host (:mod:`.warm_start`), when the run does not certify its extremes
            (``risk=None``); a certified run (the default) starts cold, where the kept vectors' atoms at the
            ends make the certificate cost more HVPs than the start saves (GPT-2 124M: 22.4 warm against
            16.0 cold per probe). ``True``: warm whenever vectors are kept; ``False``: always cold. Each result
            says ``warm`` (and ``cold_because`` when a kept start went unused). Falls back
            to a cold start at the first probe or when the parameters changed shape.
            Off for ``spectrum`` when another metric reuses its cold Lanczos run (``precond``'s raw
            spectrum, :mod:`.metric_order`): a cold run is paid for once, a warm one would be twice.
        progress: ``None`` (default) prints nothing, so the training loop's output is left alone; ``True``
            prints one line on stderr per probe (HVPs per metric against the plan, and forward passes for the
            views); a callable receives every :class:`~.progress.ProgressEvent` (plan, metric start/advance/
            end, done). The plan, each metric's planned HVPs, forward passes and vector memory, is also in
            :attr:`cost_plan` and the run's ``meta.json``.
        summary: ``True`` prints one line per probe on stderr once it is recorded: the loss and each metric's
            headline values with their errors (:func:`~.summary.summary_line`); a text stream or a callable
            (``logging.info``) receives the lines instead. Default ``False``: nothing printed. Rank 0 only.
        final_probe: :meth:`close` probes the last step when the schedule did not and either a limit
            vetoed a probe since the last one or the schedule is periodic (``every``, a budget): a short run
            still ends with a probe; that record has ``"final": true``. Not after an exception in a ``with``
            block, nor for explicit steps (``at``, ``log_spaced``, :func:`manual`) that all ran.

    Every record carries ``schedule``: the steps the schedule selected so far, how many of them a limit
    vetoed and which (``{"scheduled": 11, "skipped": 10, "skipped_by": {"overhead budget 5 %": 10}}``);
    :attr:`skips` holds the same counts in memory.

    A probe changes nothing: it uses ``torch.autograd.grad`` (never ``.backward()``), runs every forward under
    the state guard, draws randomness from its own generators, and leaves parameters, buffers, ``.grad``,
    optimizer state and the global RNG exactly as found. A probe never kills training: a failure inside a
    probe (out of memory, a non-finite loss, an unsupported layer) is recorded in the run and warned about
    once, and the next probe retries with half as many HVP vectors at a time.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        probe_data: Any,
        *,
        metrics: Sequence[str] | Mapping[str, Mapping[str, Any]] = DEFAULT_METRICS,
        schedule: Schedule | None = None,
        run_dir: str | None = None,
        mode: str = "eval",
        optimizer: torch.optim.Optimizer | None = None,
        noise_data: Any = None,
        params: str | Sequence[str] | None = None,
        group_by: str = "parameter",
        probe_samples: int | None = None,
        max_batches: int | None = None,
        chunk_size: int | None = None,
        micro_batch_size: int | None = None,
        basis_device: str | None = None,
        vector_device: str | None = None,
        memory_plan: bool = True,
        memory_cap: int | None = None,
        peak_ratio: float = DEFAULT_PEAK_RATIO,
        hvp_method: str = "auto",
        recompute_attention: bool | None = None,
        loss_form: str = "auto",
        reduction: str = "auto",
        seed: int = 0,
        force: bool = False,
        resume: bool = False,
        tensorboard: str | None = None,
        meta: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        annotate: Callable[[], Mapping[str, Any]] | None = None,
        process_group: Any = None,
        warm_start: bool | str = "auto",
        progress: bool | ProgressCallback | None = None,
        summary: Any = False,
        final_probe: bool = True,
    ):
        loss_reduction(loss_fn, reduction)  # a bad reduction, or a loss of reduction='none', before training starts
        check_probe_options(mode=mode, hvp_method=hvp_method, loss_form=loss_form, chunk_size=chunk_size,
                            micro_batch_size=micro_batch_size, basis_device=basis_device, seed=seed, run_dir=run_dir,
                            memory_cap=memory_cap, peak_ratio=peak_ratio, recompute_attention=recompute_attention,
                            vector_device=vector_device)
        self.model = unwrap_model(model)
        self.loss_fn = loss_fn
        self.metric_options = resolve_metrics(metrics)  # every form, checked before training starts
        check_sharded_metrics(self.model, self.metric_options)
        self.schedule = schedule if schedule is not None else every(100) | budget(0.05)
        if not isinstance(self.schedule, Schedule):
            raise ConfigurationError(f"schedule must be a geomprobe schedule (every, at, ...), got {type(schedule).__name__}")
        self.mode = mode
        self.optimizer = optimizer
        self.noise_data = noise_data
        self.landscape_options = dict(
            params=params, mode=mode, group_by=group_by, chunk_size=chunk_size, hvp_method=hvp_method,
            loss_form=loss_form, seed=seed, process_group=process_group, reduction=reduction,
            recompute_attention=recompute_attention,
        )
        if micro_batch_size is not None:
            self.landscape_options.update(micro_batch_size=micro_batch_size, graph_budget_bytes=1)
        if vector_device is not None:  # only when set: the options of runs before it stay as they were
            self.landscape_options["vector_device"] = vector_device
        self.seed = seed
        with rng_preserved(self.model):  # a DataLoader or an augmenting dataset must not move training's RNG
            self.batches, self.data_policy = draw_probe_batches(
                probe_data, samples=probe_samples, max_batches=max_batches, seed=seed
            )
        names, selected = select_parameters(self.model, params)
        self.space = ParamSpace(names, [p.shape for p in selected], group_by=group_by)
        if warm_start not in (True, False, "auto"):
            raise ConfigurationError(f"warm_start must be 'auto', True or False, got {warm_start!r}")
        self.warm = WarmStart(certified=warm_start is True) if warm_start else None
        self._progress = resolve_progress(progress)
        self._summary = resolve_summary(summary)
        # planned before the memory plan exists: vector memory at the largest chunk the memory plan may choose
        dtype = selected[0].dtype if selected else torch.float32
        self.cost_plan = plan_probe(self.metric_options, self.space, chunk_size=chunk_size or DEFAULT_CHUNK_SIZE,
                                    dtype=dtype, batches=len(self.batches), seed=seed)
        # products reused (precond: spectrum's Lanczos run, rmed's diagonal reads) are computed first, once
        self.probe_cost = ProbeCost(self.cost_plan, len(self.batches))  # seconds before any probe ran: the budgets' first cost
        for limit in budgets(self.schedule):
            limit.predict = limit.predict or self.probe_cost.predict
        self._run_order = run_order(self.metric_options)
        self._providers = providers(self.metric_options, self.space, seed)
        self.records: list[dict] = []
        self.failures: dict[str, int] = {}
        self._warned: set[str] = set()
        self._step = 0
        self._handle = None
        self._updates: LastUpdate | None = None
        self._grad_norm0: float | None = None
        self._basis_device = basis_device  # set to "cpu" when out-of-memory pushes Lanczos bases off the device
        # the Ritz problem's solver (scipy.linalg, ~0.2 s to import) loaded now rather than inside the first probe,
        # whose seconds the budget and the cost prediction compare with the later ones'
        prefetch_solver(wait=True)
        self._vectors: str | None = None  # "host" when out-of-memory pushes every vector off the device (host_stream)
        self.memory_plan, self.memory_cap, self.peak_ratio = bool(memory_plan), memory_cap, float(peak_ratio)
        self._ladder: set[str] = set()  # settings the out-of-memory safety net changed
        self._train_peak: int | None = None
        self._graph_per_sample: dict | None = None  # the graph figures a previous probe measured (MemoryBudget's)
        self._last_probe_step: int | None = None
        self._first_plan: dict | None = None
        self._probe_seconds, self._deadline = 0.0, None
        self.clock = clock
        self.annotate = annotate
        self._t_start = clock()
        self._closed = False
        self._keeps_blocks: weakref.finalize | None = None  # counts it out of host_blocks.keep_released
        self.final_probe = bool(final_probe)
        self.skips = SkipCounter()
        self._skipped_before = 0  # skips counted when the last probe ran
        self._stepped = False  # step() was called: there is a training step a final probe could measure
        # The run folder is checked now (a refusal before training starts) but written at the first probe,
        # so the metadata can name the optimizer that attach() brings.
        self.run_dir, self._force, self._resume, self._extra_meta = run_dir, force, resume, meta
        self.writer: RunWriter | None = None
        self._unwritten: list[dict] = []  # records a failed write kept in memory, retried at the next probe
        self._write_error: str | None = None
        # One run log for all ranks: the others hold identical records and must not race on the files.
        self._reducer = make_reducer(process_group)
        self.writes = self._reducer.rank == 0
        if run_dir is not None and self.writes and not (force or resume):
            refuse_existing(run_dir)
        if resume and run_dir is not None and self.writes:
            check_resumable(run_dir, probe_policy(self))  # records measured otherwise would not compare
        # A resumed run continues its step numbering (a restarted script counts from 0 again); step()'s own
        # argument still wins for a caller that keeps the count itself.
        self._resumed_step = last_step(run_dir) if resume and run_dir is not None else None
        if self._resumed_step is not None:
            self._step = self._resumed_step
        self._tb = None
        if tensorboard is not None and self.writes:
            from ..runs.tensorboard import TensorBoardWriter

            self._tb = TensorBoardWriter(tensorboard)

    # ------------------------------------------------------------------ hooking in
    def attach(self, optimizer: torch.optim.Optimizer, *, probe_now: bool = True) -> "GeometryProbe":
        """Probe after every optimizer step the schedule selects (a step post-hook); the loop is unchanged.

        With ``probe_now`` the schedule is also asked about step 0, the parameters before training.
        """
        if self._handle is not None:
            raise ConfigurationError("this probe is already attached; call detach() first")
        if self.writer is not None and self.optimizer is not optimizer:
            raise ConfigurationError(
                "the run already started with another optimizer; attach the optimizer before the first probe"
            )
        self.optimizer = optimizer
        self._handle = optimizer.register_step_post_hook(self._after_step)
        if wants_last_update(self.metric_options):  # the step before each probe, for direction and views
            self._updates = LastUpdate(optimizer, select_parameters(self.model, self.landscape_options["params"])[1])
        if probe_now and self._step != self._resumed_step:  # a resumed run already probed its last step
            self.step(self._step)
        return self

    def detach(self) -> None:
        """Remove the optimizer hook (the run stays open; :meth:`close` ends it)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._updates is not None:
            self._updates, _ = None, self._updates.remove()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._step += 1
        self.step(self._step)

    def step(self, step: int | None = None) -> dict | None:
        """Probe now if the schedule selects ``step`` (default: the probe's own step counter).

        Returns the record written, or ``None`` when the schedule skipped this step. The time between two
        calls, less the probe time in it, is timed as training (per step of ``step``'s numbering): what a
        budget predicts the first probe's cost from (:mod:`.probe_cost`).
        """
        if self._closed:
            raise ConfigurationError("this probe was closed; create a new GeometryProbe")
        step = self._step if step is None else int(step)
        self._step = step
        self._stepped = True
        now = self.clock()
        self.probe_cost.timer.mark(step, now)  # the training step that just ended, for the first probe's cost
        # Rank 0's decision binds every rank: a time budget can differ across ranks, and a probe is collective.
        fired = self._reducer.agree(self.schedule.should_probe(step, now))
        self.skips.note(self.schedule, fired, step)
        if not fired:
            return None
        with budgeted(self, now):  # the probe stops at the budget's allowance (allowance.py)
            return self.probe(step)

    # ------------------------------------------------------------------ measuring
    def probe(self, step: int, *, final: bool = False) -> dict:
        """Measure every metric at the current parameters now, whatever the schedule, and record it
        (``final``: marked as the probe at the end of training)."""
        # an optimizer stepped under no_grad or inference_mode still gets its probe: HVPs need autograd; and
        # whatever the probe draws (noise_data batches, a dataset's augmentation) leaves training's RNG alone
        if self._keeps_blocks is None:
            # basis mappings a probe releases wait for the next one's, their pages in place (host_blocks.py);
            # counted out at close(), or when the probe is collected without one
            keep_released(True)
            self._keeps_blocks = weakref.finalize(self, keep_released, False)
        with torch.inference_mode(False), torch.enable_grad(), rng_preserved(self.model):
            return self._probe(step, final)

    def _probe(self, step: int, final: bool = False) -> dict:
        device = next(self.model.parameters()).device
        cuda = device.type == "cuda"
        peak = read_training_peak(device)  # and a reset, so the record's peak is the probe's own
        if peak is not None and step > 0 and step != self._last_probe_step:
            self._train_peak = peak  # the training steps since the last probe, which reset the counter at its end
        predicted = self.probe_cost.predict()  # recorded beside the measured seconds
        t0, compiled_before = self.clock(), compile_seconds()
        record: dict[str, Any] = {"step": step, "time": time.time(), "wall": t0 - self._t_start}
        errors: dict[str, str] = {}
        skipped: dict[str, str] = {}
        if self.annotate is not None:
            try:  # user code: a failure or an unstorable value is a probe failure, never a training one
                extra = dict(self.annotate())
                storable(extra, "annotate")
                record.update(extra)
            except Exception as e:
                errors["annotate"] = self._failure("annotate", e, None)
        land = None
        progress = (None if self._progress is None
                    else ProbeProgress(self._progress, self.cost_plan, step, len(self.batches)))
        if progress is not None:
            progress.begin()
        # what this probe ran with; a failure may change them for the next probe
        basis_device = self._basis_device
        micro_batch_size = self.landscape_options.get("micro_batch_size")
        chunk_size = self.landscape_options["chunk_size"]
        plan = None
        try:
            land = Landscape(self.model, self.loss_fn, self.batches, memory=probe_budget(self), **self.landscape_options)
            plan, chunk_size, micro_batch_size = land.plan, land.chunk_size, land.micro_batch_size
            if basis_device is None and plan is not None:
                basis_device = plan.basis_device
            if land.graph_bytes_per_sample is not None:
                self._graph_per_sample = land.plan_figures()  # the next plan needs no measuring forward
            # a sharded Landscape's gradient is this rank's slice: its norm is the reduced one
            g = float(land.grad.norm() if land.vector_space is None else land.vector_space.norm(land.grad))
            if self._grad_norm0 is None:
                self._grad_norm0 = g
            record["loss"] = land.loss
            record["grad_norm"] = g
            if land.approximate:
                record["approximate_hvp"] = True
            if progress is not None:
                progress.count(land)
            deadline = watch(self._deadline, land)
            for i, name in enumerate(self._run_order):
                if not RITZ_READERS.intersection(self._run_order[i:]):
                    drop_unformed(land)  # a spectrum's basis kept for Ritz vectors no metric left will read
                opts = self.metric_options[name]
                land.widest_block = 0
                if deadline is not None and deadline.skips(name, skipped):
                    continue
                if progress is not None:
                    progress.start(name)
                try:
                    record[name] = self._run_metric(name, land, opts)
                except OverAllowance as e:  # the budget's allowance ran out: not a failure, the metric is skipped
                    skipped[name] = str(e)
                except OptimizerStateError as e:
                    # Not a failure: the optimizer holds no state yet (before its first step).
                    skipped[name] = str(e).splitlines()[0]
                except Exception as e:  # a probe never kills training: record, warn once, go on
                    errors[name] = self._failure(name, e, land)
                finally:
                    if progress is not None:
                        progress.end()
        except Exception as e:
            plan = plan or getattr(e, "memory_plan", None)
            errors["landscape"] = self._failure("landscape", e, land)
        finally:
            if land is not None:
                drop_unformed(land)
                land.close()
        seconds = self.clock() - t0
        self._probe_seconds += seconds
        self.probe_cost.timer.exclude(seconds)
        record["lr"] = [grp.get("lr") for grp in self.optimizer.param_groups] if self.optimizer is not None else None
        record["cost"] = {
            "hvps": land.hvps if land is not None else 0,
            "forwards": land.forwards if land is not None else 0,
            "seconds": seconds,
            "predicted_seconds": predicted,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "graph_mib": land.graph_bytes / 2**20 if land is not None else None,
            "chunk_size": chunk_size,
            "micro_batch_size": micro_batch_size,
            "basis_device": basis_device,
            "train_peak_mib": self._train_peak / 2**20 if self._train_peak is not None else None,
            "memory_plan": plan.to_dict() if plan is not None else None,
        }
        if land is not None and land.sharded:  # which HVP route measured this probe, and why
            record["cost"]["hvp_route"] = land.route
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # the next interval measures training alone
        self._last_probe_step = step
        if self._first_plan is None and plan is not None:
            self._first_plan = plan.to_dict()
        if plan is not None and plan.warnings and "memory-plan" not in self._warned:
            self._warned.add("memory-plan")
            warnings.warn(f"geomprobe: the memory plan at step {step} does not fit ({'; '.join(plan.warnings)}); "
                          "later plans are recorded in the run without a warning", RuntimeWarning, stacklevel=3)
        if errors:
            record["errors"] = errors
        if skipped:
            record["skipped"] = skipped
        record["schedule"] = self.skips.to_dict()
        self._skipped_before = self.skips.skipped
        if final:
            record["final"] = True
        settle(self, record, step, seconds, compiled_before)  # the schedule observes it (allowance.py)
        self.records.append(record)
        if self.run_dir is not None and self.writes:
            self._unwritten.append(record)
            self._write_records()
        if self._tb is not None:
            self._tb.log(record, step=step)
        if progress is not None:
            progress.finish(record["cost"]["hvps"], seconds, record["cost"]["forwards"])
        if self._summary is not None and self.writes:  # one line per probe, not one per rank
            self._summary(record)
        return record

    @property
    def unwritten_records(self) -> list[dict]:
        """Records a failed write kept in memory (empty when the run log holds every record)."""
        return list(self._unwritten)

    @property
    def write_error(self) -> str | None:
        """The last error writing the run log raised, if any."""
        return self._write_error

    def _write_records(self) -> None:
        """Append the records not yet in the run log (:func:`~.run_folder.write_pending`: a failed write
        keeps them in memory for the next try; ``force=True`` replaces a run only with a measurement)."""
        write_pending(self)

    def _run_metric(self, name: str, land: Landscape, opts: dict) -> dict:
        metric = registry.get(name)
        kwargs = dict(opts)
        context = {
            "optimizer": self.optimizer,
            "noise_data": self.noise_data,
            "grad_norm0": self._grad_norm0,
            "seed": self.seed,
            "basis_device": self._basis_device if self._basis_device is not None else getattr(land.plan, "basis_device", None),
            "max_basis": getattr(land.plan, "max_basis", None),  # taken by the metrics whose Lanczos can bound its basis
            "device_vectors": getattr(land.plan, "device_vectors", None),  # a metric's own storage on the device
            "warm": self._warm_for(name),
            "last_update": self._updates.step_of(land) if self._updates is not None else None,
        }
        accepted = inspect.signature(metric.fn).parameters
        for key, value in context.items():
            if key in accepted and key not in kwargs:
                kwargs[key] = value
        if "optimizer" in metric.needs and kwargs.get("optimizer") is None:
            raise ConfigurationError(f"metric {name!r} needs the optimizer: call probe.attach(optimizer) or pass optimizer=")
        before = land.hvps
        out = metric(land, **kwargs)
        out.setdefault("hvps", land.hvps - before)
        if "warm" in accepted:
            out.setdefault("warm", False)
        storable(out, name)  # a custom metric's unstorable value fails that metric, not the record or training
        return out

    def _warm_for(self, name: str) -> WarmStart | None:
        """The warm start for metric ``name``, or None when warm starts are off or would cost HVPs: a cold
        ``spectrum`` run another metric of the probe receives (``precond``'s raw spectrum, planned by
        :mod:`.metric_order`) is paid for once, a warm one is not shared and would be paid for twice."""
        if self.warm is None:
            return None
        return None if name == "spectrum" and name in self._providers else self.warm

    def _failure(self, where: str, e: BaseException, land: Landscape | None) -> str:
        kind = type(e).__name__
        if is_oom(e):
            kind = "OutOfMemory"
            step_down(self, where, land, e)
        message = f"{kind}: {str(e).splitlines()[0] if str(e) else kind}"
        self.failures[where] = self.failures.get(where, 0) + 1
        key = f"{where}:{kind}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"geomprobe: {where} failed at step {self._step} and was recorded in the run ({message}); "
                "training continues, later failures of this kind are recorded without a warning",
                RuntimeWarning,
                stacklevel=4,
            )
        return message

    # ------------------------------------------------------------------ accounting and closing
    def overhead(self) -> float:
        """Fraction of wall time since the probe was created that was spent probing."""
        elapsed = self.clock() - self._t_start
        return self._probe_seconds / elapsed if elapsed > 0 else 0.0

    def close(self, *, final_probe: bool | None = None) -> None:
        """Detach from the optimizer, probe the last step if no probe measured it (``final_probe``, default
        the probe's setting; see the class docstring) and close the run log (idempotent)."""
        if self._closed:
            return
        self.detach()
        final = self.final_probe if final_probe is None else bool(final_probe)
        stale = open_ended(self.schedule) or self.skips.skipped > self._skipped_before
        due = final and self._stepped and self._step != self._last_probe_step and stale
        if final and self._reducer.world_size > 1:
            due = self._reducer.agree(due)  # a probe is collective: rank 0's skips decide for every rank
        if due:
            self.probe(self._step, final=True)  # a short run, or a budget that vetoed the last steps
        elif self.skips.skipped > self._skipped_before and self.run_dir is not None and self.writes:
            # skips after the last probe would be lost with no record to carry them: a compact one, no probe
            self._unwritten.append({"step": self._step, "kind": "schedule", "time": time.time(),
                                    "schedule": self.skips.to_dict()})
        if self._unwritten:
            self._write_records()  # a last try for records a failed write kept in memory
        if self._unwritten:
            warnings.warn(unwritten_message(self), RuntimeWarning, stacklevel=2)
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass  # every record that could be written was fsync'd when appended
        if self._tb is not None:
            self._tb.close()
        release_pool()  # the page-locked blocks kept for the next probe: there is none (pinned_memory.py)
        if self._keeps_blocks is not None:
            self._keeps_blocks()  # counted out (once): the last probe out releases the mappings kept
        self._closed = True

    def __enter__(self) -> "GeometryProbe":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(final_probe=False if exc_type is not None else None)  # no probe of a model that just failed
