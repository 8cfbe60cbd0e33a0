"""The sharded exact route's memory plan (engine/sharded_plan.py): pure arithmetic, checked by hand."""

from __future__ import annotations

import pytest

from geomprobe.engine.memory_plan import HEADROOM, LANCZOS_WORK_VECTORS
from geomprobe.engine.sharded_plan import HOST_VECTORS, STREAM_PIECES, plan_sharded_exact
from geomprobe.errors import ConfigurationError

GB = 10**9
# a Llama-style 7B on 2 ranks in bf16: d = 5.93e9, a whole d-vector 11.9 GB, a slice 5.9 GB
SEVEN_B = {"dim": 5_930_000_000, "local_dim": 2_965_000_000, "itemsize": 2, "whole_bytes": 11_860_000_000,
               "largest_param_bytes": 262_144_000, "host_bytes": 200 * GB}
D, L = 11_860_000_000, 5_930_000_000


def test_without_a_limit_nothing_is_cut():
    p = plan_sharded_exact(**SEVEN_B, batch_sizes=[2], graph_bytes_per_sample=10 * GB, available_bytes=None)
    assert p.budget_bytes is None and p.fits
    assert (p.micro_batch_size, p.graph_budget_bytes, p.chunk_size, p.basis_device, p.max_basis) == (None, None, 16, None, None)


def test_the_items_add_up_to_the_peak_on_7b():
    # 18 GB already allocated (shards and AdamW moments); 139 GB free on an H200
    p = plan_sharded_exact(**SEVEN_B, batch_sizes=[2], graph_bytes_per_sample=8 * GB, available_bytes=139 * GB - 18 * GB,
                           allocated_bytes=18 * GB, basis_vectors=31, bounded_basis=True)
    it = p.items
    assert it["graphs_kept"] == 16 * GB  # one piece of 2 sequences: its saved tensors, not its gradient
    assert it["stream_hvp"] == L + STREAM_PIECES * 262_144_000 + 16 * GB  # output slice, pieces, temporaries
    assert it["lanczos_work"] == LANCZOS_WORK_VECTORS * L
    fixed = SEVEN_B["whole_bytes"] + L  # whole parameters and the gradient slice
    # the streamed build holds a few parameters' gradients beyond the graph, not the whole gradient D
    assert it["block_gradients"] == 0 and it["build_gradient"] == STREAM_PIECES * 262_144_000 < D
    assert p.peak_bytes == fixed + it["graphs_kept"] + max(it["build_gradient"], it["hvp_phase"], it["lanczos_phase"])
    assert p.vector_device is None and it["gradient_slice"] == L and it["host_vectors"] == 0
    assert p.fits and p.peak_bytes <= p.budget_bytes == int(HEADROOM * 121 * GB)
    # no whole block fits beside that: one vector at a time, streamed; the basis goes to the host
    assert p.chunk_size == 1 and p.micro_batch_size is None and p.basis_device == "cpu"


def test_a_tight_budget_cuts_micro_batches_and_bounds_the_kept_graphs():
    # 8 sequences of 4 GB of graph each within a 110 GB cap (82.8 GB beyond the 18 allocated, with headroom;
    # 17.8 GB of whole parameters and gradient slice, 30.7 GB + 4 m for an HVP in Lanczos): pieces of 8 or 4
    # do not fit; pieces of 2 keep 2 graphs (4 samples) beside one rebuilt, pieces of 1 keep 6 (24 GB)
    # beside one rebuilt (4 GB): 17.8 + 24 + 4 + 34.7 = 80.5 GB
    p = plan_sharded_exact(**SEVEN_B, batch_sizes=[8], graph_bytes_per_sample=4 * GB, available_bytes=121 * GB,
                           allocated_bytes=18 * GB, cap_bytes=110 * GB, basis_vectors=31)
    assert p.budget_source == "memory cap" and p.fits and p.peak_bytes <= p.budget_bytes
    assert p.micro_batch_size == 1 and p.chunk_size == 1
    assert p.items["graphs_kept"] == 6 * 4 * GB and p.items["graph_rebuilt"] == 4 * GB
    assert 6 * 4 * GB <= p.graph_budget_bytes < 7 * 4 * GB
    # the whole batch does not fit with the slices on the device (17.8 + 32 + 30.7 + 32 GB); it fits with
    # every slice in host memory (11.9 + 32 + 1 + 32 = 76.9 GB), which the plan then takes
    kw = dict(SEVEN_B, batch_sizes=[8], graph_bytes_per_sample=4 * GB, available_bytes=121 * GB,
              allocated_bytes=18 * GB, cap_bytes=110 * GB, basis_vectors=31)
    whole = plan_sharded_exact(**kw, overrides={"micro_batch_size": (8, "user"), "vector_device": ("cuda:0", "user")})
    assert not whole.fits and whole.sources["micro_batch_size"] == "user"
    assert whole.peak_bytes > whole.budget_bytes and "may run out of memory" in whole.warnings[0]
    host = plan_sharded_exact(**kw, overrides={"micro_batch_size": (8, "user")})
    assert host.fits and host.vector_device == "cpu" and host.sources["vector_device"] == "plan"
    assert host.peak_bytes == SEVEN_B["whole_bytes"] + 32 * GB + STREAM_PIECES * 262_144_000 + 32 * GB


def test_nothing_fits_gives_the_least_plan_and_a_warning():
    p = plan_sharded_exact(**SEVEN_B, batch_sizes=[2], graph_bytes_per_sample=8 * GB, available_bytes=120 * GB,
                           allocated_bytes=18 * GB, train_peak_bytes=30 * GB, peak_ratio=1.5, basis_vectors=31)
    # 1.5 x a 30 GB training peak leaves 27 GB beyond the 18 allocated: less than the whole parameters and
    # one graph's gradient (23.7 GB) with the Lanczos vectors; the least plan is returned, warned
    assert p.budget_source == "training peak" and not p.fits and p.chunk_size == 1
    assert p.budget_bytes == int(HEADROOM * (45 * GB - 18 * GB)) < p.peak_bytes
    assert p.basis_device == "cpu" and "may run out of memory" in p.warnings[0]


def test_small_models_keep_everything_and_batch_blocks():
    p = plan_sharded_exact(dim=10**6, local_dim=5 * 10**5, itemsize=4, whole_bytes=4 * 10**6,
                           largest_param_bytes=10**6, batch_sizes=[32, 32], graph_bytes_per_sample=10**6,
                           available_bytes=40 * GB, host_bytes=100 * GB)
    assert p.fits and p.micro_batch_size is None and p.graph_budget_bytes is None
    assert p.chunk_size == 16 and p.basis_device is None and p.max_basis is None


def test_bad_input_is_refused():
    with pytest.raises(ConfigurationError, match="non-empty batches"):
        plan_sharded_exact(**SEVEN_B, batch_sizes=[], graph_bytes_per_sample=1.0, available_bytes=None)
    with pytest.raises(ConfigurationError, match="dim >= 1"):
        plan_sharded_exact(**{**SEVEN_B, "dim": 0}, batch_sizes=[1], graph_bytes_per_sample=1.0, available_bytes=None)


def test_slices_go_to_host_memory_only_when_they_do_not_fit_on_the_device():
    # 42 GB free beyond the 18 allocated (37.8 planned): with slices on the device the whole parameters, the
    # gradient slice, an HVP's output and Lanczos' four working vectors (11.9 + 6 x 5.9 = 47.4 GB) do not fit
    # whatever the graph; in host memory the device holds the whole parameters, the graph of both samples
    # (8 GB), the pieces in flight (1 GB) and the double backward's temporaries (8 GB)
    kw = dict(SEVEN_B, batch_sizes=[2], graph_bytes_per_sample=4 * GB, available_bytes=42 * GB,
              allocated_bytes=18 * GB, basis_vectors=31, bounded_basis=True, host_bytes=1000 * GB)
    p = plan_sharded_exact(**kw)
    assert not p.warnings
    assert p.fits and p.vector_device == "cpu" and p.basis_device == "cpu" and p.micro_batch_size is None
    it = p.items
    assert it["gradient_slice"] == it["lanczos_work"] == it["basis_on_device"] == 0 and p.chunk_size == 1
    assert it["stream_hvp"] == STREAM_PIECES * 262_144_000 + 8 * GB  # no output slice on the device
    assert p.peak_bytes == SEVEN_B["whole_bytes"] + 8 * GB + it["stream_hvp"] <= p.budget_bytes
    assert it["host_vectors"] == (HOST_VECTORS + 31) * L  # the basis of 31 slices fits the host's share
    # with 200 GB of host memory the basis is bounded to the fewest vectors a restart works with, warned
    tight = plan_sharded_exact(**{**kw, "host_bytes": 200 * GB})
    assert tight.vector_device == "cpu" and tight.max_basis == 20 and "fits neither" in tight.warnings[0]
    # more room: the slices stay on the device (the basis goes to the host first)
    roomy = plan_sharded_exact(**{**kw, "available_bytes": 100 * GB})
    assert roomy.fits and roomy.vector_device is None and roomy.basis_device == "cpu"
    # too little host memory for the host's working vectors: not taken, and the plan says it does not fit
    small = plan_sharded_exact(**{**kw, "host_bytes": 60 * GB})
    assert not small.fits and small.vector_device is None
    # on a CPU the host is the device: nothing to move
    cpu = plan_sharded_exact(**kw, host_is_device=True)
    assert cpu.vector_device is None
    # the user's choice is used as given, and said to be the user's
    asked = plan_sharded_exact(**{**kw, "available_bytes": 100 * GB}, overrides={"vector_device": ("cpu", "user")})
    assert asked.vector_device == "cpu" and asked.sources["vector_device"] == "user" and asked.items["lanczos_work"] == 0
