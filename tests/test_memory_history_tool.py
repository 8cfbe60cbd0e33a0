"""benchmarks/memory_history.py's replay: the peak of a recorded allocation trace and what was live then, grouped
by the innermost frames of our own code (synthetic traces; the recording itself needs CUDA)."""

from __future__ import annotations

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "memory_history", pathlib.Path(__file__).parents[1] / "benchmarks" / "memory_history.py")
memory_history = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_history)


def _frame(name: str, line: int, file: str = "/x/geomprobe/linalg/krylov_basis.py") -> dict:
    return {"filename": file, "line": line, "name": name}


def test_the_replay_finds_the_peak_and_groups_what_was_live_by_our_frames():
    torch_frame = _frame("randn", 1, "/site-packages/torch/random.py")
    traces = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": [torch_frame, _frame("start_vector", 41)]},
        {"action": "alloc", "addr": 2, "size": 50, "frames": [_frame("out_buffer", 74)]},
        {"action": "free_requested", "addr": 1, "size": 100},  # not yet given back: still live
        {"action": "alloc", "addr": 3, "size": 30, "frames": [_frame("_on_compute", 560)]},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},  # the autograd engine's: no Python frames
        {"action": "free_completed", "addr": 3, "size": 30},
        {"action": "free_completed", "addr": 99, "size": 7},  # allocated before the recording: ignored
    ]
    h = memory_history.MemoryHistory("cuda:0", rows=3)
    h.snapshot = {"device_traces": [traces]}
    out = h.summary()
    assert out["peak_above_start_bytes"] == 180 and out["peak_event"] == 3 and out["events"] == 8
    rows = {r["where"]: (r["bytes"], r["blocks"]) for r in out["at_peak"]}
    assert rows == {"krylov_basis.py:41 start_vector": (100, 1), "krylov_basis.py:74 out_buffer": (50, 1),
                    "krylov_basis.py:560 _on_compute": (30, 1)}
    assert [r["bytes"] for r in out["at_peak"]] == [100, 50, 30]
    # each place's own highest figure, right after one of its allocations
    phases = {r["where"]: r["bytes"] for r in out["peaks_by_allocation"]}
    assert phases == {"krylov_basis.py:41 start_vector": 100, "krylov_basis.py:74 out_buffer": 150,
                      "krylov_basis.py:560 _on_compute": 180, "?": 140}
