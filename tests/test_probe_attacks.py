"""The probe's promises under attack (issue 18): options no probe could run with fail at construction with one
clear message (a probe isolates its failures, so they would otherwise fail quietly at every probe); a probe
runs whatever autograd mode the optimizer stepped in; a run log that cannot be written (a full disk) never
ends training and loses no record."""

import warnings

import pytest
import torch
from torch import nn

import geomprobe as gp
from geomprobe import ConfigurationError


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    return model, nn.CrossEntropyLoss(), (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g))


@pytest.mark.parametrize("option, match", [
    ({"mode": "bogus"}, "mode must be one of 'eval', 'train', got 'bogus'"),
    ({"hvp_method": "x"}, "hvp_method must be one of"),
    ({"loss_form": "q"}, "loss_form must be one of 'auto', 'outputs', 'model'"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"chunk_size": 2.5}, "chunk_size must be a positive integer"),
    ({"micro_batch_size": 0}, "micro_batch_size must be a positive integer"),
    ({"basis_device": "gpu9"}, "basis_device must be a torch device"),
    ({"seed": "x"}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"run_dir": ""}, "run_dir must be a folder path"),
    ({"run_dir": "   "}, "run_dir must be a folder path"),
    ({"memory_cap": -1}, "memory_cap must be a positive number"),
    ({"peak_ratio": float("nan")}, "peak_ratio must be a positive finite number"),
    ({"peak_ratio": 0}, "peak_ratio must be a positive finite number"),
    ({"metrics": {"spectrum": {"tolx": 1e-3}}}, "metric 'spectrum' has no option 'tolx'; it takes k, tol"),
    ({"metrics": {"rmed": {"hvp": 64}}}, "metric 'rmed' has no option 'hvp'"),
])
def test_bad_options_fail_at_construction(option, match, tmp_path):
    model, loss_fn, batch = _setup()
    with pytest.raises(ConfigurationError, match=match):
        gp.GeometryProbe(model, loss_fn, batch, **option)


def test_good_options_and_probe_filled_ones_are_accepted(tmp_path):
    model, loss_fn, batch = _setup()
    probe = gp.GeometryProbe(model, loss_fn, batch, metrics={"spectrum": {"tol": 1e-4, "basis_device": "cpu"}},
                             mode="train", hvp_method="autograd", loss_form="outputs", chunk_size=4,
                             micro_batch_size=8, basis_device="cpu", seed=3, run_dir=tmp_path / "run",
                             memory_cap=2**30, peak_ratio=2)
    probe.close()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_a_step_taken_without_autograd_is_still_probed(context):
    model, loss_fn, batch = _setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), metrics={"spectrum": {"tol": 1e-6}})
    probe.attach(opt, probe_now=False)
    loss_fn(model(batch[0]), batch[1]).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed probe warns: none may
        with context():
            opt.step()
            assert not torch.is_grad_enabled()  # the caller's mode is as it was after the probe
    record = probe.records[-1]
    assert "errors" not in record and record["spectrum"]["converged"]
    probe.close()


def _failing_writes(monkeypatch, fail_for: int):
    """append_line raising ENOSPC for its first ``fail_for`` calls, as a full disk would."""
    import errno

    from geomprobe.runs import writer

    real, calls = writer.append_line, {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] <= fail_for:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(writer, "append_line", full_disk)


def _train(probe, model, loss_fn, batch, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.attach(opt, probe_now=False)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()


def test_a_full_disk_is_a_probe_failure_and_the_records_are_written_once_it_clears(monkeypatch, tmp_path):
    model, loss_fn, batch = _setup()
    _failing_writes(monkeypatch, fail_for=2)
    probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), run_dir=tmp_path / "run",
                             metrics={"spectrum": {"tol": 1e-4}})
    with pytest.warns(RuntimeWarning, match="writing the run log .* failed at step 1 .*No space left"):
        _train(probe, model, loss_fn, batch, 4)  # never raises out of optimizer.step()
    probe.close()
    assert [r["step"] for r in gp.RunReader(tmp_path / "run").records] == [1, 2, 3, 4]
    assert probe.failures["run log"] == 2


def test_records_that_could_never_be_written_are_kept_and_named_at_close(monkeypatch, tmp_path):
    model, loss_fn, batch = _setup()
    _failing_writes(monkeypatch, fail_for=10**6)
    probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), run_dir=tmp_path / "run",
                             metrics={"spectrum": {"tol": 1e-4}})
    with pytest.warns(RuntimeWarning, match="failed at step 1"):
        _train(probe, model, loss_fn, batch, 3)
    with pytest.warns(RuntimeWarning, match=r"3 probe record\(s\) could not be written .*\(steps 1, 2, 3\)"):
        probe.close()
    assert [r["step"] for r in probe.records] == [1, 2, 3] and all("spectrum" in r for r in probe.records)


class _Opaque:
    """A value the run log cannot store."""


@pytest.mark.parametrize("annotate, match", [
    (lambda: 1 / 0, "ZeroDivisionError"),
    (lambda: {"note": _Opaque()}, "cannot store"),
    (lambda: 42, "TypeError"),
])
def test_an_annotate_callback_that_fails_is_a_probe_failure(annotate, match, tmp_path):
    model, loss_fn, batch = _setup()
    probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), run_dir=tmp_path / "run",
                             metrics={"spectrum": {"tol": 1e-4}}, annotate=annotate)
    with pytest.warns(RuntimeWarning, match="annotate failed"):
        _train(probe, model, loss_fn, batch, 2)
    probe.close()
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [1, 2] and all(r["spectrum"]["converged"] for r in records)
    assert all(match in r["errors"]["annotate"] for r in records)


def test_a_custom_metric_returning_an_unstorable_value_fails_alone(monkeypatch, tmp_path):
    from geomprobe.metrics import registry

    def opaque(land):
        return {"value": _Opaque()}

    monkeypatch.setitem(registry.REGISTRY, "opaque", registry.Metric("opaque", opaque, "none"))
    model, loss_fn, batch = _setup()
    probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), run_dir=tmp_path / "run",
                             metrics={"opaque": {}, "spectrum": {"tol": 1e-4}})
    with pytest.warns(RuntimeWarning, match="opaque failed"):
        _train(probe, model, loss_fn, batch, 2)
    probe.close()
    records = gp.RunReader(tmp_path / "run").records
    assert [r["step"] for r in records] == [1, 2]
    assert all("cannot store" in r["errors"]["opaque"] and r["spectrum"]["converged"] for r in records)


class _Augmenting(torch.utils.data.Dataset):
    """A dataset that augments with every global RNG a user might reach for."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        import random

        import numpy as np

        jitter = 0.01 * torch.randn(self.X.shape[1]) + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        return self.X[i] + jitter.to(self.X.dtype), self.y[i]


def _train_with_rng(model, make_probe, steps, seed=5):
    """A script that seeds, builds its probe, then trains with a loop whose every step draws from the global
    RNGs (dropout-like noise, shuffles)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    probe = make_probe() if make_probe is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if probe is not None:
        probe.attach(opt, probe_now=False)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(64, 3, generator=g), torch.randint(0, 2, (64,), generator=g)
    for _ in range(steps):
        idx = torch.randperm(64)[:16]
        noise = 0.01 * torch.randn(16, 3) + 1e-3 * random.random() + 1e-3 * float(np.random.rand())
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx] + noise), y[idx]).backward()
        opt.step()
    if probe is not None:
        probe.close()
    return [p.detach().clone() for p in model.parameters()], probe


def test_data_drawn_by_the_probe_leaves_training_bit_identical():
    # noise_data as a DataLoader (the documented use) and an augmenting dataset as probe data: iterating them
    # draws from the global RNGs, at construction and at every probe
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(256, 3, generator=g), torch.randint(0, 2, (256,), generator=g)
    plain_model, _, _ = _setup()
    plain, _ = _train_with_rng(plain_model, None, 6)
    model, loss_fn, _ = _setup()
    probed, probe = _train_with_rng(model, lambda: gp.GeometryProbe(
        model, loss_fn, DataLoader(_Augmenting(X, y), batch_size=32, shuffle=True),
        noise_data=DataLoader(_Augmenting(X, y), batch_size=4, shuffle=True),
        metrics={"spectrum": {"tol": 1e-4}, "noise": {}}, schedule=gp.every(2), max_batches=2), 6)
    assert len(probe.records) == 3 and all("errors" not in r for r in probe.records), probe.records[-1].get("errors")
    assert all(torch.equal(a, b) for a, b in zip(plain, probed))


def test_a_resumed_run_continues_its_step_numbering(tmp_path):
    model, loss_fn, batch = _setup()
    for steps in (3, 2):  # a script run, then restarted with resume=True
        probe = gp.GeometryProbe(model, loss_fn, batch, schedule=gp.every(1), run_dir=tmp_path / "run", resume=True,
                                 metrics={"spectrum": {"tol": 1e-4}})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        probe.attach(opt)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model(batch[0]), batch[1]).backward()
            opt.step()
        probe.close()
    assert [r["step"] for r in gp.RunReader(tmp_path / "run").records] == [0, 1, 2, 3, 4, 5]


def test_a_second_process_cannot_write_the_same_run(tmp_path):
    import subprocess
    import sys
    import textwrap

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from geomprobe.runs import RunWriter
        w = RunWriter({str(run_dir)!r}, {{"model": "MLP"}})
        w.append({{"step": 0}})
        print("ready", flush=True)
        sys.stdin.readline()
        w.close()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for kw in ({"resume": True}, {"force": True}):
            with pytest.raises(ConfigurationError, match=f"being written by process {holder.pid}"):
                gp.RunWriter(run_dir, **kw)
    finally:
        holder.communicate("done\n", timeout=60)
    with gp.RunWriter(run_dir, resume=True) as w:  # released at close: the run continues
        w.append({"step": 1})
    assert [r["step"] for r in gp.RunReader(run_dir).records] == [0, 1]


def test_a_lock_left_by_a_dead_writer_does_not_block(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    with gp.RunWriter(run_dir) as w:
        w.append({"step": 0})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run_dir / ".writer.lock").write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with gp.RunWriter(run_dir, resume=True) as w:
        w.append({"step": 1})
    assert [r["step"] for r in gp.RunReader(run_dir).records] == [0, 1]


def _sum_hessian(model, batches):
    """The exact Hessian of the summed cross-entropy over the union of ``batches`` (float64)."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def f(w):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(w, [s.numel() for s in shapes]), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (X,)), y, reduction="sum")

    return torch.autograd.functional.hessian(f, w0)


def test_a_summed_loss_over_unequal_batches_gives_the_hessian_of_the_union():
    # weighted as a mean (n_b / N), a sum loss over several batches was 33-50 % off without a word
    model, _, _ = _setup()
    model = model.double()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (n,), generator=g))
               for n in (10, 3)]
    H = _sum_hessian(model, batches)
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    for loss_fn, kw in ((nn.CrossEntropyLoss(reduction="sum"), {}),  # read from the module
                        (lambda model, b: nn.functional.cross_entropy(model(b[0]), b[1], reduction="sum"),
                         {"reduction": "sum"})):  # said by the caller
        land = gp.Landscape(model, loss_fn, batches, **kw)
        assert land.reduction == "sum"
        assert torch.allclose(land.hvp(v), H @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigurationError, match="reduction='none'.*returns one loss per sample"):
        gp.Landscape(model, nn.CrossEntropyLoss(reduction="none"), batches)
    with pytest.raises(ConfigurationError, match="reduction must be one of"):
        gp.GeometryProbe(model, nn.CrossEntropyLoss(), batches, reduction="avg")
