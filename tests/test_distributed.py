"""Data-parallel probing: 2 gloo ranks on CPU, each with part of the probe data, against 1 process on all of it.

The ranks run under torchrun in a subprocess (tests/distributed_worker.py) once per module; each saves what
it measured, and the checks here compare the ranks with each other and with one process on the union.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import NOISE_CASES, PROBE_STEPS, hvp_vectors, make_noise_problem, make_problem, noise_results
from tolerances import FLOAT64_REL

import geomprobe as gp
from geomprobe.engine.distributed import Reducer, make_reducer
from geomprobe.metrics import spectrum

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH_TIMEOUT_S = 120  # a hung collective must fail the test, not the suite
FD_REL = 1e-5  # finite-difference HVPs carry O(eps^2) truncation; both routes use the same eps


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HELLO = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
"""


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    # Loopback explicitly: gloo otherwise binds to whatever the host name resolves to, which varies by machine.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _killed_by_signal(done: subprocess.CompletedProcess) -> bool:
    """True when every failed rank died of a signal (negative exit code), none of a Python error (exit 1)."""
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", done.stderr)]
    return bool(codes) and all(c < 0 for c in codes)


def run_two_ranks(worker: Path, out: Path, fsdp: bool = False) -> None:
    """Run ``worker out`` on two gloo ranks under torchrun and assert it succeeded; skip (with why) where torch
    has no gloo (or no FSDP2, with ``fsdp``) or where two gloo processes cannot run on this machine at all."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            pytest.skip("this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    done = _torchrun(worker, str(out))
    if done.returncode != 0 and _killed_by_signal(done):
        # A rank killed by a signal inside torch's C++ with no Python error of its own: once more, then judge.
        done = _torchrun(worker, str(out))
    if done.returncode != 0:
        # Tell a machine on which two gloo processes cannot run at all from a failure of geomprobe's own.
        hello = out / "hello.py"
        hello.write_text(HELLO)
        bare = _torchrun(hello)
        if bare.returncode != 0:
            pytest.skip(f"two gloo processes cannot run on this machine: {bare.stderr[-1500:]}")
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks(WORKER, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


@pytest.fixture(scope="module")
def union() -> dict:
    model, loss_fn, X, y = make_problem()
    land = gp.Landscape(model, loss_fn, (X, y))
    V = hvp_vectors(land.dim)
    out = {"n_samples": land.n_samples, "loss": land.loss, "grad": land.grad, "hvp": land.hvp(V),
           "spectrum": spectrum(land, k=2, tol=1e-10)}
    out["hvp_fd"] = gp.Landscape(model, loss_fn, (X, y), hvp_method="finite-difference").hvp(V[0])
    return out


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = FLOAT64_REL) -> bool:
    return bool((got - want).abs().max() <= rel * max(1.0, want.abs().max().item()))


def test_two_ranks_equal_one_process_on_the_union(ranks, union):
    results, _ = ranks
    for r in results:
        assert r["n_samples"] == union["n_samples"] == 23
        assert abs(r["loss"] - union["loss"]) <= FLOAT64_REL * abs(union["loss"])
        assert _close(r["grad"], union["grad"])
        assert _close(r["hvp"], union["hvp"])
        assert _close(r["hvp_single"], union["hvp"][0])
        assert _close(r["hvp_fd"], union["hvp_fd"], FD_REL)
        for key in ("lambda_max", "lambda_min"):
            assert abs(r["spectrum"][key] - union["spectrum"][key]) <= FLOAT64_REL * abs(union["spectrum"][key])
        assert r["spectrum"]["converged"]


def test_every_rank_returns_identical_results(ranks):
    (a, b), _ = ranks
    assert a["loss"] == b["loss"]
    for key in ("grad", "hvp", "hvp_single", "hvp_fd"):
        assert torch.equal(a[key], b[key]), key
    # the same Lanczos steps on both ranks: bitwise-equal reduced HVPs keep them in lock-step
    assert a["spectrum"] == b["spectrum"]


def _measured(record: dict) -> dict:
    """A record without its clock readings, which legitimately differ between ranks."""
    return {k: v for k, v in record.items() if k not in ("time", "wall", "cost")}


def test_probe_writes_the_run_once_on_rank_zero(ranks):
    (a, b), out = ranks
    written = gp.RunReader(out / "run").records
    steps = list(range(0, PROBE_STEPS + 1, 2))
    assert [r["step"] for r in written] == steps  # once, not twice: rank 1 wrote nothing
    assert [_measured(r) for r in written] == [_measured(r) for r in a["records"]]
    assert [_measured(r) for r in a["records"]] == [_measured(r) for r in b["records"]]
    assert all("errors" not in r for r in written)
    assert json.loads((out / "run" / "meta.json").read_text())["probe"]["world_size"] == 2


def test_probe_at_step_zero_equals_one_process(ranks, union):
    (a, _), _ = ranks
    first = a["records"][0]
    assert abs(first["loss"] - union["loss"]) <= FLOAT64_REL * abs(union["loss"])
    assert abs(first["spectrum"]["lambda_max"] - union["spectrum"]["lambda_max"]) <= (
        FLOAT64_REL * abs(union["spectrum"]["lambda_max"]) + first["spectrum"]["lambda_max_err"]
    )


def test_dtensor_parameters_outside_fsdp2_are_refused_with_a_clear_error(ranks):
    for r in ranks[0]:
        if r["sharded_error"].startswith("skipped"):
            pytest.skip(r["sharded_error"])
        assert "sharded across ranks" in r["sharded_error"] and "'0.weight'" in r["sharded_error"]
        assert "docs/distributed.md" in r["sharded_error"] and "fully_shard" in r["sharded_error"]
        assert r["fsdp_error"] == "ShardedLandscape"  # FSDP2 models are measured, not refused


def test_a_failure_on_one_rank_stops_every_rank(ranks):
    (a, b), _ = ranks
    assert b["failure"].startswith("NonFiniteLossError: the loss on probe batch 0 is nan")
    assert a["failure"].startswith("GeomprobeError: building the Landscape failed on 1 other rank(s) of 2")


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested result as ``{"a.b.c": leaf}`` (lists of numbers stay leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_noise_statistics_combine_across_ranks(ranks):
    (a, b), _ = ranks
    model, loss_fn, X, y, opt = make_noise_problem()
    one = noise_results(model, loss_fn, (X, y), opt)  # one process on the union of the two shards
    assert a["noise"] == b["noise"]  # identical on every rank, not merely close
    for name in NOISE_CASES:
        got, want = _flat(a["noise"][name]), _flat(one[name])
        assert got.keys() == want.keys(), name
        for key, w in want.items():
            g = got[key]
            if isinstance(w, float) and not isinstance(w, bool):
                # absolute floor: mean_grad_rel_diff is a rounding-level number near 1e-16
                assert abs(g - w) <= FLOAT64_REL * abs(w) + 1e-12, (name, key, g, w)
            else:
                assert g == w, (name, key, g, w)
    assert a["noise"]["noise"]["samples"] == 64 and a["noise"]["noise_capped"]["samples"] == 50
    assert a["noise"]["noise_chunked"]["passes"] == 2 and a["noise"]["isotropy_chunked"]["passes"] == 2
    for name in ("noise", "noise_chunked", "noise_capped"):
        for key in ("alpha_pooled", "alpha_standardized", "hill_alpha", "noise_scale"):
            assert a["noise"][name][key] is not None, (name, key)
    for key in ("cv", "isotropy_index", "escape", "cv_preconditioned", "isotropy_index_preconditioned"):
        assert a["noise"]["isotropy"][key] is not None, key


def test_without_a_process_group_the_reducer_is_the_identity():
    assert type(make_reducer()) is Reducer and type(make_reducer(False)) is Reducer
    with pytest.raises(gp.ConfigurationError, match="not initialized"):
        make_reducer(object())
