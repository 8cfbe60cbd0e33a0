"""Attention with the blockwise double backward (geomprobe.engine.autodiff.attndouble) against float64 dense
Hessians, torch's math kernel and torch's own fused kernel."""

import pytest
import torch
import torch.nn.functional as F
from reference import dense_hessian
from test_convdouble import _node_names
from torch import nn

import geomprobe as gp
from geomprobe.engine.autodiff import attndouble, attnkernels
from geomprobe.engine.autodiff.fastdouble import fast_double_backward
from geomprobe.engine.saved_bytes import SavedBytes
from geomprobe.engine.state import frozen, math_attention
from geomprobe.errors import UnsupportedOperationError

EXACT = 1e-10  # two float64 routes to the same product, relative to its norm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def routes(monkeypatch):
    """Records whether each handled call ran torch's fused kernel; ``force_blockwise()`` sends every call to the
    blockwise forward (what happens where torch itself would pick the math kernel)."""
    choose = attndouble._fused_choice

    class Routes:
        def __init__(self) -> None:
            self.seen: list[bool] = []
            self.blockwise = False

        def choice(self, *a, **k) -> bool:
            self.seen.append(False if self.blockwise else choose(*a, **k))
            return self.seen[-1]

        def force_blockwise(self) -> None:
            self.blockwise = True

    r = Routes()
    monkeypatch.setattr(attndouble, "_fused_choice", r.choice)
    return r


class AttnBlock(nn.Module):
    """Projections around one ``F.scaled_dot_product_attention`` call; queries from the first ``tq`` tokens,
    keys and values from the rest (``tk`` tokens) or, without ``tk``, from the same tokens."""

    def __init__(self, d=4, heads=2, kv_heads=2, hd=3, dv=3, classes=3, tk=None, **sdpa):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.dv, self.tk, self.sdpa = heads, kv_heads, hd, dv, tk, sdpa
        self.q = nn.Linear(d, heads * hd)
        self.k = nn.Linear(d, kv_heads * hd, bias=False)
        self.v = nn.Linear(d, kv_heads * dv)
        self.out = nn.Linear(heads * dv, classes)

    def forward(self, x):
        B, T, _ = x.shape
        xq, xk = (x[:, : T - self.tk], x[:, T - self.tk :]) if self.tk else (x, x)
        q = self.q(xq).view(B, -1, self.heads, self.hd).transpose(1, 2)
        k = self.k(xk).view(B, -1, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(xk).view(B, -1, self.kv_heads, self.dv).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, **self.sdpa)
        return self.out(torch.tanh(o).transpose(1, 2).flatten(2).mean(1))


def _masks(heads=1, tq=5, tk=5):
    """A boolean mask (one per head when ``heads > 1``, broadcast over the batch, which the Landscape may split)
    and an additive one."""
    g = torch.Generator().manual_seed(7)
    boolean = torch.rand(heads, tq, tk, generator=g) > 0.4
    boolean[0, 1] = False  # a query that sees no key: its output and derivatives are zero
    additive = torch.randn(tq, tk, generator=g, dtype=torch.float64)
    additive[2, :2] = -torch.inf
    return boolean, additive


CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3, "is_causal": True},
    "bool mask": {"attn_mask": "bool"},
    "float mask": {"attn_mask": "float"},
    "gqa": {"heads": 4, "kv_heads": 2, "enable_gqa": True, "is_causal": True},
    "gqa bool mask": {"heads": 4, "kv_heads": 2, "enable_gqa": True, "attn_mask": "bool"},
    "Tq != Tk": {"tk": 7, "attn_mask": "float"},
    "Dv != D": {"tk": 7, "dv": 2, "attn_mask": "bool"},  # no fused CPU kernel: blockwise on both routes
    "Tq > Tk causal": {"tk": 3, "is_causal": True},
}


def _case(name: str, seed=0):
    spec = dict(CASES[name])
    tk = spec.get("tk")
    tq = 5
    boolean, additive = _masks(4 if spec.get("heads") == 4 else 1, tq, tk or tq)
    if spec.get("attn_mask") == "bool":
        spec["attn_mask"] = boolean
    elif spec.get("attn_mask") == "float":
        spec["attn_mask"] = additive
    torch.manual_seed(seed)
    model = AttnBlock(**spec).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, tq + (tk or 0), 4, generator=g, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (3,), generator=g)


@pytest.mark.parametrize("route", ["fused", "blockwise"])
@pytest.mark.parametrize("name", list(CASES))
def test_hvp_matches_the_dense_hessian_and_the_math_kernel(name, route, routes):
    if route == "blockwise":
        routes.force_blockwise()
    model, loss_fn, x, y = _case(name)
    H = dense_hessian(model, loss_fn, [(x, y)])  # through torch's math kernel, forced by frozen()
    fast = gp.Landscape(model, loss_fn, (x, y), recompute_attention=True)
    slow = gp.Landscape(model, loss_fn, (x, y), fast_double_backward=False)
    fused = route == "fused" and name != "Dv != D"
    assert routes.seen and all(f == fused for f in routes.seen)
    V = torch.randn(4, fast.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = V @ H
    for got in (fast.hvp(V), torch.stack([fast.hvp(v) for v in V])):  # batched (vmap) and one at a time
        assert rel(got, ref) < EXACT
    assert rel(fast.hvp(V), slow.hvp(V)) < EXACT
    assert rel(fast.grad, slow.grad) < EXACT


def test_the_fused_route_is_taken_where_torch_has_a_fused_kernel(routes):
    model, _loss_fn, x, _y = _case("causal")
    with frozen(model), fast_double_backward():  # the Landscape's math-kernel forcing is on here
        names = _node_names(model(x))
    assert "_AttentionBackward" in names
    assert routes.seen == [True]  # the CPU flash kernel, not the forced math one
    model, *_ = _case("Dv != D")  # no fused kernel takes Dv != D on the CPU: blockwise forward
    x = torch.randn(3, 12, 4, dtype=torch.float64)
    with frozen(model), fast_double_backward():
        assert "_AttentionBackward" in _node_names(model(x))
    assert routes.seen == [True, False]


def test_the_users_backend_choice_is_kept(routes):
    """A user who disabled the fused kernels gets the blockwise forward, never the T x T math graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, _loss_fn, x, _y = _case("plain")
    with sdpa_kernel([SDPBackend.MATH]), frozen(model), fast_double_backward():
        assert "_AttentionBackward" in _node_names(model(x))
    with frozen(model), fast_double_backward():
        model(x)
    assert routes.seen == [False, True]


@pytest.mark.parametrize("route", ["fused", "blockwise"])
def test_many_tiles_give_the_same_products(route, routes, monkeypatch):
    if route == "blockwise":
        routes.force_blockwise()
    model, loss_fn, x, y = _case("gqa bool mask", seed=3)
    one = gp.Landscape(model, loss_fn, (x, y), recompute_attention=True)
    V = torch.randn(3, one.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = one.hvp(V)
    # a budget of two query rows per tile, and then one: many tiles over samples, heads and rows
    L = attnkernels.Layout(N=3, Hk=2, g=2, Tq=5, Tk=5, D=3, Dv=3, scale=1.0, causal=False,
                           compute_dtype=torch.float64)
    for budget, tile in ((2 * 2 * 5 * 8 * 10, (1, 1, 2)), (1, (1, 1, 1))):
        assert L.tile(10, budget) == tile
        monkeypatch.setattr(attnkernels, "CHUNK_BYTES", budget)
        tiled = gp.Landscape(model, loss_fn, (x, y), recompute_attention=True)
        assert rel(tiled.hvp(V), a) < EXACT
        assert rel(torch.stack([tiled.hvp(v) for v in V]), a) < EXACT
    assert L.tile(10, 10**9) == (3, 2, 5)
    assert L.tile(10, 2 * 5 * 2 * 5 * 8 * 10) == (1, 2, 5)


@pytest.mark.parametrize("route", ["fused", "blockwise"])
@pytest.mark.parametrize("kw", [{"is_causal": True}, {"attn_mask": "bool", "scale": 0.7},
                                {"attn_mask": "float", "enable_gqa": True}, {"tk": 4, "dv": 2}],
                         ids=["causal", "bool-scale", "float-gqa", "cross"])
def test_gradcheck_and_gradgradcheck_of_the_functions(kw, route, routes):
    if route == "blockwise":
        routes.force_blockwise()
    kw = dict(kw)
    g = torch.Generator().manual_seed(5)
    tk, dv = kw.pop("tk", 5), kw.pop("dv", 3)
    hk = 1 if kw.get("enable_gqa") else 2
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(2, 1, 5, tk, generator=g) > 0.3
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(5, tk, generator=g, dtype=torch.float64)
    q = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hk, tk, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hk, tk, dv, generator=g, dtype=torch.float64, requires_grad=True)

    def attention(q, k, v):
        with fast_double_backward():
            out = F.scaled_dot_product_attention(q, k, v, **kw)
        assert type(out.grad_fn).__name__ == "_AttentionBackward"
        return out

    assert torch.autograd.gradcheck(attention, (q, k, v))
    assert torch.autograd.gradgradcheck(attention, (q, k, v), check_batched_grad=True)


def _attention_hvp(fast: bool, q, k, v, **kw):
    """Output, gradient and one HVP of ``sum(sin(attention) * w)`` in q, k, v (float64)."""
    ps = [t.clone().requires_grad_() for t in (q, k, v)]
    with math_attention(), fast_double_backward(fast):
        o = F.scaled_dot_product_attention(*ps, **kw)
        assert (type(o.grad_fn).__name__ == "_AttentionBackward") == fast
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
        grads = torch.autograd.grad((torch.sin(o) * w).sum(), ps, create_graph=True)
    V = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2 + i), dtype=t.dtype) for i, t in enumerate(ps)]
    return [o.detach()], [g.detach() for g in grads], list(torch.autograd.grad(grads, ps, V))


@pytest.mark.parametrize("layout", ["3-d", "5-d, mask broadcast over one batch dimension", "GQA, 1 kv head"])
def test_other_layouts_match_the_math_kernel(layout):
    g = torch.Generator().manual_seed(11)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if layout == "3-d":
        args, kw = (r(3, 6, 4), r(3, 8, 4), r(3, 8, 4)), {"attn_mask": torch.rand(6, 8, generator=g) > 0.3}
    elif layout.startswith("5-d"):  # the mask varies over the first batch dimension only: normalized by a copy
        args, kw = (r(2, 3, 2, 6, 4), r(2, 3, 2, 6, 4), r(2, 3, 2, 6, 4)), {"attn_mask": r(2, 1, 1, 6, 6)}
    else:
        args, kw = (r(2, 4, 6, 4), r(2, 1, 6, 4), r(2, 1, 6, 2)), {"enable_gqa": True, "is_causal": True}
    for ours, theirs in zip(_attention_hvp(True, *args, **kw), _attention_hvp(False, *args, **kw)):
        for a, b in zip(ours, theirs):
            assert rel(a, b) < EXACT


def test_values_and_first_derivatives_are_torchs_own_kernel():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g, requires_grad=True) for _ in range(3))
    dO = torch.randn(2, 3, 16, 8, generator=g)
    with math_attention(), fast_double_backward():
        ours = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch's choice: the CPU flash kernel
    assert type(theirs.grad_fn).__name__ == "ScaledDotProductFlashAttentionForCpuBackward0"
    assert torch.equal(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), dO), torch.autograd.grad(theirs, (q, k, v), dO)):
        assert torch.equal(a, b)


def test_bfloat16_recomputes_in_float32(routes):
    """bf16 inputs (8-bit mantissa): the HVP is within 2e-2 (relative norm) of float64, about what torch's own
    math kernel achieves in bf16; the float32 recomputation is no worse than twice that."""
    g = torch.Generator().manual_seed(8)
    base = [torch.randn(2, 2, 32, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(2, 2, 32, 16, generator=g, dtype=torch.float64)
    V = [torch.randn(2, 2, 32, 16, generator=g, dtype=torch.float64) for _ in range(3)]

    def hvp(dtype, fast):
        ps = [t.to(dtype).requires_grad_() for t in base]
        with math_attention(), fast_double_backward(fast):
            o = F.scaled_dot_product_attention(*ps, is_causal=True)
            loss = (torch.sin(o.double()) * w).sum()
            grads = torch.autograd.grad(loss, ps, create_graph=True)
        return torch.cat([h.double().flatten() for h in torch.autograd.grad(grads, ps, [v.to(dtype) for v in V])])

    exact = hvp(torch.float64, False)
    ours, math_bf16 = rel(hvp(torch.bfloat16, True), exact), rel(hvp(torch.bfloat16, False), exact)
    assert routes.seen == [True]
    assert ours < 2e-2 and ours < 2 * math_bf16 + 1e-3
    assert rel(hvp(torch.float32, True), exact) < 1e-5


def test_saved_bytes_drop_by_more_than_the_probabilities(routes):
    """T = 128: the handler keeps q, k, v, the output and its gradient (and the fused kernel's log-sum-exp),
    never the (T x T) probabilities; the math graph keeps at least those."""
    B, H, T, D = 2, 2, 128, 16
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    item, head_rows = 8, B * H * T

    def saved(fast: bool) -> int:
        counter = SavedBytes([])
        with math_attention(), counter.hooks(), fast_double_backward(fast):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad((o * w).sum(), (q, k, v), create_graph=True)
        return counter.bytes

    probabilities = head_rows * T * item
    fused, math = saved(True), saved(False)
    # q, k, v, w (the product's saved factor), the output, dO: six (B, H, T, D); the log-sum-exp (B, H, T)
    assert fused == 6 * head_rows * D * item + head_rows * item
    routes.force_blockwise()
    blockwise = saved(True)
    assert blockwise == 5 * head_rows * D * item  # no output, no log-sum-exp
    assert (math - fused) / probabilities >= 1.0
    assert (math - blockwise) / probabilities >= 1.0 + 1 * D / T  # and the output besides


def test_a_models_retained_graph_drops_by_the_probabilities():
    """Landscape.graph_bytes of a two-layer model at T = 128: down by at least one (T x T) per head and layer."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([AttnBlock(d=8, heads=2, hd=4, dv=4, classes=8, is_causal=True) for _ in range(2)])

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.head = blocks, nn.Linear(8, 3)

        def forward(self, x):
            return self.head(sum(b(x) for b in self.blocks))

    model = Two().double()
    x = torch.randn(2, 128, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    fast = gp.Landscape(model, nn.CrossEntropyLoss(), (x, y), memory=None, recompute_attention=True)
    slow = gp.Landscape(model, nn.CrossEntropyLoss(), (x, y), memory=None, fast_double_backward=False)
    probabilities = 2 * 2 * 2 * 128 * 128 * 8  # layers x samples x heads x T x T x float64
    assert (slow.graph_bytes - fast.graph_bytes) / probabilities >= 1.0
    v = torch.randn(fast.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel(fast.hvp(v), slow.hvp(v)) < EXACT


def test_third_derivatives_are_refused():
    model, loss_fn, x, y = _case("causal")
    params = list(model.parameters())
    with frozen(model), fast_double_backward():
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    with pytest.raises(UnsupportedOperationError, match="third derivatives.*fast_double_backward=False"):
        torch.autograd.grad(grads, params, [torch.ones_like(p) for p in params], create_graph=True)


def test_calls_it_cannot_take_keep_torchs_path():
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g, requires_grad=True) for _ in range(3))
    learned_bias = torch.randn(6, 6, requires_grad=True)

    def name(*args, **kw):
        with math_attention(), fast_double_backward():
            return type(F.scaled_dot_product_attention(*args, **kw).grad_fn).__name__

    assert name(q, k, v) == "_AttentionBackward"
    assert name(q, k, v, dropout_p=0.1) != "_AttentionBackward"
    assert name(q, k, v, attn_mask=learned_bias) != "_AttentionBackward"  # a mask with a gradient
    assert name(q, k[:, :1], v[:, :1]) != "_AttentionBackward"  # heads differ without enable_gqa
    assert name(q[0, 0], k[0, 0], v[0, 0]) != "_AttentionBackward"  # no heads dimension
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert name(q, k, v) != "_AttentionBackward"
    with torch.no_grad(), math_attention(), fast_double_backward():
        assert F.scaled_dot_product_attention(q, k, v).grad_fn is None
    with math_attention(), fast_double_backward(enabled=False):
        assert type(F.scaled_dot_product_attention(q, k, v).grad_fn).__name__ != "_AttentionBackward"
    # torch's own errors stay torch's: a mask together with is_causal
    with pytest.raises(RuntimeError):
        name(q, k, v, attn_mask=torch.ones(6, 6, dtype=torch.bool), is_causal=True)


def test_declined_dropout_keeps_the_math_kernel_and_its_hessian():
    model, loss_fn, x, y = _case("causal")
    model.sdpa["dropout_p"] = 0.5  # train mode: masks fixed by the Landscape's seed
    fast = gp.Landscape(model, loss_fn, (x, y), mode="train", recompute_attention=True)
    slow = gp.Landscape(model, loss_fn, (x, y), mode="train", fast_double_backward=False)
    v = torch.randn(fast.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(fast.hvp(v), slow.hvp(v))


# ---------------------------------------------------------------------------------------------- Hugging Face
def _lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def _hf(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=11,
                                         bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=12, vocab_size=11,
                                          max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
        cls = transformers.LlamaForCausalLM
    config.attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).double().eval()


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_sdpa_goes_through_the_handler(kind, padded, routes):
    model = _hf(kind)
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids}
    if padded:
        batch["attention_mask"] = torch.tensor([[1] * 9, [0, 0] + [1] * 7, [1] * 9])
    fast = gp.Landscape(model, _lm_loss, [batch], recompute_attention=True)
    slow = gp.Landscape(model, _lm_loss, [batch], fast_double_backward=False)
    assert routes.seen and all(routes.seen)  # every layer's attention, through torch's fused kernel
    if not padded and kind == "llama":  # Llama passes enable_gqa=True when there is no mask
        with frozen(model), fast_double_backward():
            assert "_AttentionBackward" in _node_names(_lm_loss(model, batch))
    V = torch.randn(3, fast.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert rel(fast.hvp(V), slow.hvp(V)) < EXACT
    if kind == "gpt2" and not padded:  # small enough for a dense Hessian (a few hundred parameters)
        H = slow.hvp(torch.eye(slow.dim, dtype=torch.float64))
        assert rel(fast.hvp(V), V @ H) < EXACT


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cuda_matches_the_math_kernel(dtype, routes):
    """On CUDA: torch's flash / memory-efficient kernels in the forward (float64 has none: blockwise). float64
    HVPs equal the math kernel's to rounding; in float32 and bf16 both kernels round differently, so each is
    compared with the float64 HVP at the same weights: the fused route's error is at most twice the math
    kernel's own (plus a floor of a few units of the dtype's rounding). The route follows torch's own choice:
    never fused in float64, fused in bf16; torch 2.11 on an H200 picks its math kernel for float32 at head
    dimensions 2-16 (benchmarks/results/cuda_rounding_r34_h200.json), which the handler then leaves to the
    blockwise forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = _hf("llama").to("cuda", dtype)
    ids = torch.randint(0, 11, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    fast = gp.Landscape(model, _lm_loss, [{"input_ids": ids}], recompute_attention=True)
    slow = gp.Landscape(model, _lm_loss, [{"input_ids": ids}], fast_double_backward=False)
    assert routes.seen
    if dtype != torch.float32:
        assert all(f == (dtype == torch.bfloat16) for f in routes.seen)
    V = torch.randn(2, fast.dim, generator=torch.Generator(device="cuda").manual_seed(2), device="cuda", dtype=dtype)
    if dtype == torch.float64:
        assert rel(fast.hvp(V), slow.hvp(V)) < EXACT
        return
    ref_model = _hf("llama").to("cuda", torch.float64)
    ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref = gp.Landscape(ref_model, _lm_loss, [{"input_ids": ids}], fast_double_backward=False).hvp(V.double())
    err_fast, err_slow = rel(fast.hvp(V).double(), ref), rel(slow.hvp(V).double(), ref)
    floor = 8 * torch.finfo(dtype).eps
    assert err_fast <= 2 * err_slow + floor, (err_fast, err_slow)


def test_a_landscape_keeps_torch_attention_unless_asked(routes):
    """Where memory is roomy the default plan leaves attention on torch's math kernel (faster per HVP on GPT-2
    124M at 512 tokens on an H200, benchmarks/RESULTS.md §6): the handler sees no call, the other fast paths stay on, and
    ``recompute_attention=True`` routes every layer's attention through it with the same HVPs."""
    model = _hf("gpt2")
    batch = {"input_ids": torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(3))}
    default = gp.Landscape(model, _lm_loss, [batch])
    assert default.fast_double_backward and not default.recompute_attention
    assert routes.seen == []
    asked = gp.Landscape(model, _lm_loss, [batch], recompute_attention=True)
    assert routes.seen and all(routes.seen)
    V = torch.randn(2, default.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert rel(asked.hvp(V), default.hvp(V)) < EXACT
