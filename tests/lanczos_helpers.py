"""Helpers of the Lanczos tests (tests/test_partial_reorth.py, tests/test_delayed_lanczos.py): the Landscape of a
tiny GPT-2 language model, whose HVPs round inside a chain of layers as a network's do."""

from __future__ import annotations

import pytest
import torch


def tiny_gpt2_landscape(dtype: torch.dtype = torch.float32):
    """A 2-layer, width-64 GPT-2 (random init, seed 0, no dropout) in ``dtype`` on 4 x 32 random tokens, as an
    eval-mode Landscape. Skips the test where transformers is missing."""
    transformers = pytest.importorskip("transformers")
    from geomprobe import Landscape

    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=256,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config).to(dtype)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    return Landscape(model, lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
                     [{"input_ids": tokens}], mode="eval")
