"""Where CUDA's half-type products round: the evidence behind ``vectors.sub_rows``' CUDA paths and the attention
route's test.

For ``w - c B`` with ``w`` close to ``c B`` (Gram-Schmidt's case) in bf16 and fp16, each product form's largest
error against float64, in units of the bound for one rounding of a float32-accumulated sum (``assert_sub`` in
``tests/test_segmented_products.py``: at most 1 passes), with torch's reduced-precision reduction flag on and
off: ``mm(out_dtype=float32)`` then a float32 subtraction, the block-diagonal ``addmm_`` in the half type, and
``addmm`` into a float32 copy. Then which SDPA kernel torch picks for float32 and bf16 at head dimensions 2-8 with
and without a mask. Prints one JSON object.

    python benchmarks/cuda_rounding.py --out r.json
"""

from __future__ import annotations

import argparse
import json

import torch

U32 = torch.finfo(torch.float32).eps / 2


def case(n, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    c = torch.randn(n, generator=g, dtype=torch.float64).to(torch.float32)
    cr = c.to(dtype).double()
    w = (cr @ B.double() + 1e-2 * torch.randn(d, generator=g, dtype=torch.float64)).to(dtype)
    return B, c, w, cr


def excess(out, w, cr, B):
    exact = w.double() - cr @ B.double()
    u = torch.finfo(w.dtype).eps / 2
    terms = w.double().abs() + cr.abs() @ B.double().abs()
    bound = u * exact.abs() + (B.shape[0] + 2) * U32 * terms * (1 + u) + torch.finfo(w.dtype).smallest_normal * u
    return float(((out.double() - exact).abs() / bound).max())


def forms(n, d, dtype, K=16):
    B, c, w, cr = case(n, d, dtype)
    Bc, wc, ch = B.cuda(), w.cuda(), c.to(dtype).cuda()
    res = {}
    out = wc.clone()
    out.sub_(torch.mm(ch[None], Bc, out_dtype=torch.float32)[0])
    res["mm_out_dtype_then_sub"] = excess(out.cpu(), w, cr, B)
    out = wc.clone()
    res["float32_copies"] = excess((wc.float() - ch.float() @ Bc.float()).to(dtype).cpu(), w, cr, B)
    if d % K == 0:
        L = d // K
        C = torch.zeros(K, n, K, dtype=dtype, device="cuda")
        C.diagonal(dim1=0, dim2=2).copy_(ch[:, None].expand(n, K))
        C = C.view(K, n * K)
        out = wc.clone()
        out.view(K, L).addmm_(C, Bc.view(n * K, L), alpha=-1)
        res["blockdiag_addmm_half"] = excess(out.cpu(), w, cr, B)
        o32 = wc.float().view(K, L).addmm_(C.float(), Bc.float().view(n * K, L), alpha=-1)
        res["blockdiag_addmm_float32"] = excess(o32.view(-1).to(dtype).cpu(), w, cr, B)
        prod = torch.mm(C, Bc.view(n * K, L), out_dtype=torch.float32)
        res["blockdiag_mm_out_dtype_then_sub"] = excess((wc.view(K, L).float() - prod).view(-1).to(dtype).cpu(),
                                                        w, cr, B)
    # does the product round c B to the half type before the subtraction? (the error then is ~ u |c B|)
    exact = w.double() - cr @ B.double()
    rounded_first = (w.double() - (cr @ B.double()).to(dtype).double()).to(dtype).double()
    res["rounded_product_form_err_max"] = float((rounded_first - exact).abs().max())
    return res


def sdpa_choices():
    out = {}
    choose = getattr(torch, "_fused_sdp_choice", None)
    for dtype in (torch.float32, torch.bfloat16):
        for hd in (2, 4, 8, 16):
            for masked in (False, True):
                q = torch.randn(4, 4, 64, hd, device="cuda", dtype=dtype)
                k = torch.randn(4, 2, 64, hd, device="cuda", dtype=dtype)
                mask = torch.ones(4, 1, 64, 64, device="cuda", dtype=torch.bool).tril() if masked else None
                try:
                    r = int(choose(q, k, k, mask, 0.0, not masked, scale=None, enable_gqa=True))
                except Exception as e:  # noqa: BLE001 - recorded
                    r = f"{type(e).__name__}: {e}"[:200]
                out[f"{str(dtype)[6:]}_hd{hd}_{'mask' if masked else 'causal'}"] = r
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    res = {"torch": torch.__version__, "sdpa": sdpa_choices()}
    m = torch.backends.cuda.matmul
    for flag in (True, False):
        m.allow_bf16_reduced_precision_reduction = flag
        m.allow_fp16_reduced_precision_reduction = flag
        for dtype in (torch.bfloat16, torch.float16):
            for n, d in ((2, 1 << 17), (22, 1 << 17), (22, (1 << 20) + 4099), (300, 1 << 17)):
                res[f"reduced_{flag}_{str(dtype)[6:]}_n{n}_d{d}"] = forms(n, d, dtype)
    print(json.dumps(res, indent=1))
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
