"""Manifold-constrained hyper-connections: `hc_pre` (mix weights + Sinkhorn + stream collapse) and `hc_post`.

hc_pre, one program per block of tokens, one kernel:
  1. over the flattened streams (n*D wide): the (2+n)n mixing logits as three small dots (pre, post, comb
     weights, each padded to >= 16 columns for the tensor cores) and the sum of squares for the RMS factor;
  2. per token, in registers: pre = sigmoid(.) + eps, post = 2 sigmoid(.), comb = Sinkhorn(softmax rows + eps)
     with `iters` normalisations (the first one columns only) on a [tokens, n, n] tile (n a power of two with
     n*n >= 16, the tensor-core minimum; V4 has n = 4);
  3. y = sum_j pre_j x_j over D, re-reading x (it is L2-hot).
hc_post, one program per (token, channel block): out[k] = post_k f + sum_j comb[j, k] res_j, the j-sum taken
  first and in order j = 0, 1, ..., as the reference's explicit sum (registry.hc_post), so the interpreter is
  bit-exact with it (a GPU may still contract a product and a sum into one FMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.targets.tensorrt.kernels.common import (F32_PRECISION, check_shape, check_tensors, f32, next_pow2,
                                                    require)


@triton.jit
def hc_pre_kernel(x_ptr, fn_ptr, scale_ptr, base_ptr, T, D, y_ptr, post_ptr, comb_ptr,
                  NS: tl.constexpr, ITERS: tl.constexpr, NORM_EPS: tl.constexpr, HC_EPS: tl.constexpr,
                  PRECISION: tl.constexpr, NP: tl.constexpr, NN: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # x [T, NS, D] f32, fn [(2+NS)NS, NS*D], scale [3], base [(2+NS)NS]
    # -> y [T, D], post [T, NS], comb [T, NS, NS]; program: BLOCK_T tokens
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = toks < T
    width = NS * D
    x_rows = x_ptr + toks[:, None].to(tl.int64) * width
    cn = tl.arange(0, NP)  # pre / post column j
    cc = tl.arange(0, NN)  # comb column c = j*NS + k (NN = NS*NS)
    n_ok = cn < NS
    mix_pre = tl.zeros((BLOCK_T, NP), tl.float32)
    mix_post = tl.zeros((BLOCK_T, NP), tl.float32)
    mix_comb = tl.zeros((BLOCK_T, NN), tl.float32)
    sumsq = tl.zeros((BLOCK_T,), tl.float32)
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < width
        xt = tl.load(x_rows + ks[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
        sumsq += tl.sum(xt * xt, axis=1)
        # fn rows are contiguous along k: load [rows, BK] tiles and transpose in the dot
        f_pre = tl.load(fn_ptr + cn[:, None] * width + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        f_post = tl.load(fn_ptr + (NS + cn)[:, None] * width + ks[None, :], mask=n_ok[:, None] & k_ok[None, :],
                         other=0.0)
        f_comb = tl.load(fn_ptr + (2 * NS + cc)[:, None] * width + ks[None, :], mask=k_ok[None, :], other=0.0)
        mix_pre += tl.dot(xt, tl.trans(f_pre), input_precision=PRECISION)
        mix_post += tl.dot(xt, tl.trans(f_post), input_precision=PRECISION)
        mix_comb += tl.dot(xt, tl.trans(f_comb), input_precision=PRECISION)
    rms = 1.0 / tl.sqrt_rn(sumsq / width + NORM_EPS)
    s_pre = tl.load(scale_ptr)
    s_post = tl.load(scale_ptr + 1)
    s_comb = tl.load(scale_ptr + 2)
    b_pre = tl.load(base_ptr + cn, mask=n_ok, other=0.0)
    b_post = tl.load(base_ptr + NS + cn, mask=n_ok, other=0.0)
    b_comb = tl.load(base_ptr + 2 * NS + cc)
    pre = tl.sigmoid(mix_pre * rms[:, None] * s_pre + b_pre[None, :]) + HC_EPS  # [BT, NP]
    post = 2.0 * tl.sigmoid(mix_post * rms[:, None] * s_post + b_post[None, :])
    # comb [t, j, k]: softmax over each row j, + eps, then Sinkhorn (columns first, then rows and columns)
    comb = tl.reshape(mix_comb * rms[:, None] * s_comb + b_comb[None, :], (BLOCK_T, NS, NS))
    comb = tl.exp(comb - tl.max(comb, axis=2)[:, :, None])
    comb = comb / tl.sum(comb, axis=2)[:, :, None] + HC_EPS
    comb = comb / (tl.sum(comb, axis=1)[:, None, :] + HC_EPS)
    for _ in range(ITERS - 1):
        comb = comb / (tl.sum(comb, axis=2)[:, :, None] + HC_EPS)
        comb = comb / (tl.sum(comb, axis=1)[:, None, :] + HC_EPS)
    tl.store(post_ptr + toks[:, None] * NS + cn[None, :], post, mask=t_ok[:, None] & n_ok[None, :])
    tl.store(comb_ptr + toks[:, None] * NN + cc[None, :], tl.reshape(comb, (BLOCK_T, NN)), mask=t_ok[:, None])
    # y = sum_j pre_j x_j
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = t_ok[:, None] & (dd < D)[None, :]
        y = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for j in tl.static_range(NS):
            pre_j = tl.sum(tl.where(cn[None, :] == j, pre, 0.0), axis=1)
            y += pre_j[:, None] * tl.load(x_rows + j * D + dd[None, :], mask=m, other=0.0)
        tl.store(y_ptr + toks[:, None].to(tl.int64) * D + dd[None, :], y, mask=m)


HC_PRE_BLOCKS = dict(BLOCK_T=16, BLOCK_K=128, BLOCK_D=128)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, norm_eps: float,
           hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dsv4::hc_pre: x [B,S,n,D], fn [(2+n)n, nD], scale [3], base [(2+n)n] -> (y [B,S,D], post [B,S,n],
    comb [B,S,n,n])."""
    op = "hc_pre"
    check_tensors(op, x=x, fn=fn, scale=scale, base=base)
    require(x.dim() == 4, op, f"`x` must be [B, S, n, D], got shape {list(x.shape)}")
    b, s, n, d = x.shape
    mix = (2 + n) * n
    check_shape(op, "fn", fn, (mix, n * d))
    check_shape(op, "scale", scale, (3,))
    check_shape(op, "base", base, (mix,))
    require(iters >= 1, op, f"iters must be >= 1, got {iters}")
    require(n & (n - 1) == 0 and n * n >= 16, op,
            f"the stream count n (dim 2 of `x`) must be a power of two >= 4, got {n}")
    t = b * s
    y = torch.empty(b, s, d, dtype=torch.float32, device=x.device)
    post = torch.empty(b, s, n, dtype=torch.float32, device=x.device)
    comb = torch.empty(b, s, n, n, dtype=torch.float32, device=x.device)
    if t:
        hc_pre_kernel[(triton.cdiv(t, HC_PRE_BLOCKS["BLOCK_T"]),)](
            f32(x), f32(fn), f32(scale), f32(base), t, d, y, post, comb, NS=n, ITERS=iters,
            NORM_EPS=float(norm_eps), HC_EPS=float(hc_eps), PRECISION=F32_PRECISION, NP=max(16, n), NN=n * n,
            **HC_PRE_BLOCKS)
    return y, post, comb


@triton.jit
def hc_post_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, T, D, out_ptr,
                   NS: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr):
    # f [T, D], res [T, NS, D], post [T, NS], comb [T, NS, NS] -> out [T, NS, D]; program (token, channel block)
    t = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ks = tl.arange(0, NP)
    d_ok, k_ok = dd < D, ks < NS
    f = tl.load(f_ptr + t * D + dd, mask=d_ok, other=0.0)
    post = tl.load(post_ptr + t * NS + ks, mask=k_ok, other=0.0)
    mixed = tl.zeros((NP, BLOCK_D), tl.float32)
    for j in tl.static_range(NS):
        c_j = tl.load(comb_ptr + t * NS * NS + j * NS + ks, mask=k_ok, other=0.0)  # comb[j, k]
        term = c_j[:, None] * tl.load(res_ptr + (t * NS + j) * D + dd, mask=d_ok, other=0.0)[None, :]
        mixed += term  # 0 + term 0 is term 0 exactly
    out = post[:, None] * f[None, :] + mixed  # [NP, BD]
    tl.store(out_ptr + (t * NS + ks)[:, None] * D + dd[None, :], out, mask=k_ok[:, None] & d_ok[None, :])


def hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """dsv4::hc_post: f [B,S,D], res [B,S,n,D], post [B,S,n], comb [B,S,n,n] -> [B,S,n,D]."""
    op = "hc_post"
    check_tensors(op, f=f, res=res, post=post, comb=comb)
    require(res.dim() == 4, op, f"`res` must be [B, S, n, D], got shape {list(res.shape)}")
    b, s, n, d = res.shape
    check_shape(op, "f", f, (b, s, d))
    check_shape(op, "post", post, (b, s, n))
    check_shape(op, "comb", comb, (b, s, n, n))
    out = torch.empty(b, s, n, d, dtype=torch.float32, device=res.device)
    if out.numel():
        block_d = min(256, next_pow2(d))
        hc_post_kernel[(b * s, triton.cdiv(d, block_d))](
            f32(f), f32(res), f32(post), f32(comb), b * s, d, out, NS=n, NP=next_pow2(n), BLOCK_D=block_d)
    return out
