"""Optional TensorBoard scalars: the scalar leaves of a record at its step; a warned no-op without tensorboard."""

from __future__ import annotations

import math
import sys
import warnings

import pytest

import geomprobe.runs.tensorboard as tb
from geomprobe.runs.tensorboard import TensorBoardWriter, scalar_leaves

RECORD = {
    "step": 200,
    "loss": 0.5,
    "spectrum": {"lambda_max": 3.0, "top": [3.0, 2.0], "converged": True, "hvps": 40},
    "rmed": {"blocks": {"fc1.weight": {"rmed": float("nan")}}},
    "density": {"$array": "arrays/d.npy", "shape": [400], "dtype": "float64"},
    "errors": [],
    "note": "text",
}


class FakeSummaryWriter:
    """Stands in for torch's SummaryWriter and remembers what it was given."""

    def __init__(self, log_dir: str, **kwargs) -> None:
        self.log_dir, self.kwargs, self.scalars, self.closed = log_dir, kwargs, [], False

    def add_scalar(self, tag, value, global_step=None) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_scalar_leaves_are_numbers_under_slash_tags():
    leaves = scalar_leaves(RECORD)
    assert set(leaves) == {"loss", "spectrum/lambda_max", "spectrum/converged", "spectrum/hvps",
                           "rmed/blocks/fc1.weight/rmed"}
    assert leaves["spectrum/converged"] == 1.0 and math.isnan(leaves["rmed/blocks/fc1.weight/rmed"])


def test_logs_scalars_at_the_record_step(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "_summary_writer_class", lambda: FakeSummaryWriter)
    writer = TensorBoardWriter(tmp_path / "tb", flush_secs=5)
    assert writer.enabled
    fake = writer._writer
    assert fake.log_dir == str(tmp_path / "tb") and fake.kwargs == {"flush_secs": 5}
    assert writer.log(RECORD) == 5
    assert ("spectrum/lambda_max", 3.0, 200) in fake.scalars
    assert {step for _, _, step in fake.scalars} == {200}
    writer.log({"loss": 1.0}, step=7)
    assert fake.scalars[-1] == ("loss", 1.0, 7)
    writer.close()
    assert fake.closed and not writer.enabled


def test_without_tensorboard_warns_once_and_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "_WARNED", False)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails as if not installed
    with pytest.warns(UserWarning, match=r"TensorBoard logging is off .*pip install tensorboard"):
        writer = TensorBoardWriter(tmp_path / "tb")
    assert not writer.enabled
    assert writer.log(RECORD) == 0
    writer.flush()
    writer.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second writer must stay silent
        with TensorBoardWriter(tmp_path / "tb2") as second:
            assert second.log(RECORD) == 0
    assert not (tmp_path / "tb").exists()


def test_real_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoardWriter(tmp_path / "tb") as writer:
        assert writer.enabled
        writer.log(RECORD)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
