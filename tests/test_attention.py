"""dbkernels.attention: every backend against math attention in fp32 (the spec's truth).

CPU: the reference and the Triton kernels under the interpreter, small shapes, fp32
(1e-5-ish relative) and fp16 (2x rule). GPU (marker gpu): compiled Triton with
fp16/bf16 at the full SD / SDXL UNet shapes, 2x rule: our max error against the fp32
math reference is at most twice that of PyTorch's own same-precision math
attention, plus one rounding unit (eps of the dtype) of the largest reference value.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import dbkernels
from dbkernels import _backend
from dbkernels.ops.attention import attention, attention_or_sdpa, is_supported, sdpa_attention
from dbkernels.ops.attention import op as attn_op
from dbkernels.ops.attention import reference as R

HEAD_DIMS = [40, 64, 80, 160]
LENGTHS = [(77, 77), (64, 77), (130, 130), (257, 77)]


def make_qkv(b, h, lq, lk, d, dtype, device="cpu", seed=0, strided=False, bias=None):
    """q, k, v (+ key_bias, dout). strided: q is a (B, L, H, D) view, k and v slices of one kv buffer,
    v also with a last-dim stride of 2."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if strided:
        q = rn(b, lq, h, d).transpose(1, 2)
        kv = rn(b, lk, 2, h, 2 * d)
        k = kv[:, :, 0, :, :d].transpose(1, 2)
        v = kv[:, :, 1, :, ::2].transpose(1, 2)
        assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 2
    else:
        q, k, v = rn(b, h, lq, d), rn(b, h, lk, d), rn(b, h, lk, d)
    kb = None
    if bias == "bk":
        kb = torch.randn(b, lk, generator=g).to(device)
    elif bias == "bhk":
        kb = torch.randn(b, h, lk, generator=g).to(device)
    dout = rn(b, h, lq, d)
    return q, k, v, kb, dout


def run(backend, q, k, v, kb, dout, scale=None):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    with dbkernels.force_backend(backend):
        out = attention(q, k, v, scale=scale, key_bias=kb)
        out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def math_grads(q, k, v, kb, dout, dtype=torch.float32, scale=None):
    """Math attention (full softmax) computed in `dtype` with autograd: (out, dq, dk, dv)."""
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    out = R.math_attention(q, k, v, key_bias=kb, scale=scale)
    out.backward(dout.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


NAMES = ("out", "dq", "dk", "dv")


def assert_matches(got, q, k, v, kb, dout, scale=None, fp32_rtol=2e-5):
    truth = math_grads(q, k, v, kb, dout, scale=scale)
    for name, x, t, src in zip(NAMES, got, truth, (q, q, k, v)):
        assert x.dtype == src.dtype and x.shape == src.shape, (name, x.dtype, x.shape)
        assert torch.isfinite(x).all(), name
    if q.dtype == torch.float32:
        for name, x, t in zip(NAMES, got, truth):
            err = (x - t).abs().max().item()
            assert err <= fp32_rtol * t.abs().max().item() + 1e-6, (name, err, t.abs().max().item())
    else:
        lowp = math_grads(q, k, v, kb, dout, dtype=q.dtype, scale=scale)
        eps = torch.finfo(q.dtype).eps  # slack: one rounding of the largest value in q's dtype
        for name, x, t, p in zip(NAMES, got, truth, lowp):
            err = (x.float() - t).abs().max().item()
            pt_err = (p.float() - t).abs().max().item()
            assert err <= 2 * pt_err + eps * t.abs().max().item(), (name, err, pt_err)


# ------------------------------------------------------------------ CPU grid

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"{x[0]}x{x[1]}")
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("bias", [None, "bk"])
def test_fp32_grid(backend, lengths, d, bias, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    lq, lk = lengths
    # B*H = 1 keeps the interpreter quick (batch / head offsets: the strided D=80 cases here
    # and the fp16, layout and key_bias tests below)
    b, h = (1, 2) if d == 80 else (1, 1)
    args = make_qkv(b, h, lq, lk, d, torch.float32, seed=d + lq, strided=(d == 80), bias=bias)
    assert_matches(run(backend, *args), *args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_fp16_two_x_rule(backend, d, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    args = make_qkv(1, 2, 64, 77, d, torch.float16, seed=7, strided=True, bias="bhk")
    assert_matches(run(backend, *args), *args)


@pytest.mark.parametrize("d", [40, 80, 160])
def test_triton_padded_head_layout(d, cpu_triton, monkeypatch):
    """The grid runs the two-tile head layout (40 = 32 + 16, ...); the padded one-tile layout
    (40 -> 64, the other autotune choice on the GPU) must agree too."""
    from dbkernels.ops.attention import triton_kernels as TK

    assert TK.head_layouts(d)[-1][2]  # these D have a split layout, so the grid did not cover this one
    monkeypatch.setattr(TK, "INTERPRET_SPLIT", False)
    args = make_qkv(1, 2, 70, 77, d, torch.float32, seed=d, strided=True, bias="bhk")
    assert_matches(run("triton", *args), *args)


def test_head_layouts():
    from dbkernels.ops.attention import triton_kernels as TK

    assert TK.head_layouts(64) == [(64, 16, False)]
    assert TK.head_layouts(40)[-1] == (32, 16, True)
    assert TK.head_layouts(80)[-1] == (64, 16, True)
    assert TK.head_layouts(160)[-1] == (128, 32, True)
    for d in range(8, 257, 8):
        for d0, d1, hi in TK.head_layouts(d):
            assert d0 + (d1 if hi else 0) >= d and (not hi or d0 < d)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strides_layouts_and_scale(backend, request):
    """Transposed views and slices need no copy and give the same numbers; out follows q's layout."""
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    q, k, v, kb, dout = make_qkv(2, 2, 33, 45, 24, torch.float32, seed=3, strided=True, bias="bhk")
    got = run(backend, q, k, v, kb, dout, scale=0.3)
    dense = run(backend, q.contiguous(), k.contiguous(), v.contiguous(), kb, dout, scale=0.3)
    for name, a, b in zip(NAMES, got, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert got[0].stride() == q.stride()  # (B, L, H, D) memory: out.transpose(1, 2).reshape is free
    assert_matches(got, q, k, v, kb, dout, scale=0.3)
    # and the spec agrees with PyTorch's SDPA
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=kb[:, :, None, :], scale=0.3)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lse_saved(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    q, k, v, kb, _ = make_qkv(1, 2, 40, 70, 16, torch.float32, seed=4, bias="bk")
    bias = attn_op._prepare_bias(kb, q, k)
    with dbkernels.force_backend(backend):
        out, lse = attn_op._attention_fwd_op(q, k, v, bias, 0.25)
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + kb[:, None, None, :]
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 40)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_bias_is_log_weight_of_reference_keys(backend, request):
    """FABRIC: Lk = own tokens + reference tokens; bias log(w) on a key == that key repeated w times,
    bias 0 == no bias; (B, Lk), (1, Lk) and (B, H, Lk) broadcast as documented."""
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    b, h, l_own, l_ref, d = 2, 2, 24, 9, 40
    q, k, v, _, _ = make_qkv(b, h, l_own, l_own + l_ref, d, torch.float32, seed=5)
    w = torch.tensor([1.0] * l_own + [2.0] * l_ref)
    with dbkernels.force_backend(backend):
        biased = attention(q, k, v, key_bias=w.log().expand(b, -1))
        k_rep = torch.cat([k, k[:, :, l_own:]], 2)
        v_rep = torch.cat([v, v[:, :, l_own:]], 2)
        repeated = attention(q, k_rep, v_rep)
        torch.testing.assert_close(biased, repeated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention(q, k, v, key_bias=torch.zeros(b, l_own + l_ref)),
                                   attention(q, k, v), rtol=1e-6, atol=1e-6)
        kb1 = torch.randn(1, l_own + l_ref)
        torch.testing.assert_close(attention(q, k, v, key_bias=kb1),
                                   attention(q, k, v, key_bias=kb1.expand(b, -1)[:, None].expand(b, h, -1)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_bias_minus_inf_zero_weight_keys(backend, request):
    """bias = log 0 = -inf drops a key, even when it blanks out whole key blocks."""
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    q, k, v, _, dout = make_qkv(1, 2, 40, 100, 16, torch.float32, seed=12)
    kb = torch.zeros(1, 100)
    kb[:, :70] = float("-inf")
    got = run(backend, q, k, v, kb, dout)
    kept = run("reference", q, k[:, :, 70:], v[:, :, 70:], None, dout)
    for name, a, b in zip(NAMES, got, kept):
        if name in ("dk", "dv"):
            assert (a[:, :, :70] == 0).all(), name
            a = a[:, :, 70:]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_twice_and_no_grad(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    q, k, v, kb, dout = make_qkv(1, 2, 20, 30, 32, torch.float32, seed=6, bias="bk")
    qq = q.clone().requires_grad_(True)
    kb.requires_grad_(True)  # accepted; gets no gradient
    with dbkernels.force_backend(backend):
        out = attention(qq, k, v, key_bias=kb)
        (2 * out * dout).sum().backward(retain_graph=True)
        g1 = qq.grad.clone()
        qq.grad = None
        (out * dout).sum().backward()
        torch.testing.assert_close(g1, 2 * qq.grad)
        assert kb.grad is None
        with torch.no_grad():
            o2 = attention(q, k, v, key_bias=kb)
    assert not o2.requires_grad
    torch.testing.assert_close(o2, out.detach())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_ops_pass_opcheck(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    q, k, v, kb, dout = make_qkv(1, 2, 9, 13, 16, torch.float32, seed=8, bias="bk")
    bias = attn_op._prepare_bias(kb, q, k)
    with dbkernels.force_backend(backend):
        out, lse = attn_op._attention_fwd_op(q, k, v, bias, 0.25)
        torch.library.opcheck(attn_op._attention_fwd_op, (q, k, v, bias, 0.25))
        torch.library.opcheck(attn_op._attention_fwd_op, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                                          None, 0.5))
        torch.library.opcheck(attn_op._attention_bwd_op, (dout, q, k, v, out, lse, bias, 0.25))


def test_torch_compile_traces_it_fullgraph():
    q, k, v, kb, dout = make_qkv(1, 2, 12, 10, 16, torch.float32, seed=9, bias="bk")

    def f(q, k, v):
        return (attention(q * 1.0, k, v, key_bias=kb) * dout).sum()

    ins1 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ins2 = [x.clone().requires_grad_(True) for x in (q, k, v)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    l1 = compiled(*ins1)
    l1.backward()
    l2 = f(*ins2)
    l2.backward()
    torch.testing.assert_close(l1, l2)
    for a, b in zip(ins1, ins2):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------ compiled mode without a GPU

_COMPILE_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton  # before dbkernels: compiled mode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dbkernels.ops.attention import triton_kernels as TK

UNIT = {"sqd", "skd", "svd", "sod", "sdd", "sdkd", "sdvd", "sdqd"}

def specialise(kernel, dtype, consts):
    # as the JIT sees a diffusers call: last-dim strides 1, 16-byte aligned pointers, SM = 8
    consts.update({n: 1 for n in kernel.arg_names if n in UNIT}, SM=8)
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("LSE", "Delta", "Bias"):
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name[0].isupper() and name not in ("H", "Lq", "Lk"):
            sig[name], attrs[(i,)] = "*" + dtype, [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return ASTSource(kernel, sig, constexprs=consts, attrs=attrs)

out = []
for arch, dtype, d, split in json.loads(sys.argv[1]):
    layouts = TK.head_layouts(d)
    d0, d1, hi = layouts[-1] if split else layouts[0]
    for name, kernel, bm, bn in (("fwd", TK._fwd_kernel, 64, 64), ("dkdv", TK._bwd_dkdv_kernel, 32, 64),
                                 ("dq", TK._bwd_dq_kernel, 64, 32)):
        consts = dict(D=d, HAS_BIAS=True, PREC="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D0=d0, BLOCK_D1=d1, HAS_HI=hi)
        k = triton.compile(specialise(kernel, dtype, consts), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=4, num_stages=2))
        width = d0 + (d1 if hi else 0)
        model = {"fwd": TK._fwd_smem, "dkdv": TK._dkdv_smem, "dq": TK._dq_smem}[name]
        est = model(bm, bn, width, 2, 4 if dtype == "fp32" else 2, arch >= 90)
        out.append([arch, dtype, d, split, name, k.metadata.shared, est, k.asm["ttgir"].count("async_copy_global_to_local")])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm86_and_sm90():
    """The interpreter skips Triton's compiler; compile (to cubin, with the bundled ptxas) the three
    kernels in both head layouts for the 3090 and the H100, in a fresh process without TRITON_INTERPRET."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    cases = [[86, "bf16", 80, True], [86, "fp32", 40, True], [90, "fp16", 160, False]]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(cases)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas for Triton's NVIDIA backend here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * len(cases)
    for arch, dtype, d, split, name, shared, estimate, async_copies in results:
        case = (arch, dtype, d, split, name, shared, estimate)
        assert 0 < shared <= (99 if arch < 90 else 227) * 1024, case  # opt-in shared memory per block
        assert 0.9 * estimate <= shared <= estimate * 1.1, case  # the autotune prune's model holds
        if name == "fwd":  # the k / v loads are pipelined (cp.async): they are known 16-byte aligned
            assert async_copies > 0, case


# ------------------------------------------------------------------ dispatcher

def test_dispatcher(monkeypatch):
    assert _backend.GPU_PREFERENCE["attention"] == ("triton", "reference")
    assert _backend.choose("attention", "cpu") == "reference"
    with dbkernels.force_backend("cuda"):
        with pytest.raises(dbkernels.BackendUnavailable, match="attention has no cuda"):
            attention(*make_qkv(1, 1, 4, 4, 8, torch.float32)[:3])
    monkeypatch.setenv("DBKERNELS_BACKEND", "reference")
    assert _backend.choose("attention", "cpu") == "reference"


def test_env_var_selects_triton(monkeypatch, cpu_triton):
    q, k, v, kb, dout = make_qkv(1, 1, 9, 11, 16, torch.float32, seed=10)
    monkeypatch.setenv("DBKERNELS_BACKEND", "triton")
    assert _backend.choose("attention", "cpu") == "triton"
    out = attention(q, k, v)
    torch.testing.assert_close(out, R.math_attention(q, k, v), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ bad input and the fallback

def test_bad_input_errors():
    q, k, v, _, _ = make_qkv(2, 2, 5, 6, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim D=44"):
        attention(*make_qkv(1, 1, 4, 4, 44, torch.float32)[:3])
    with pytest.raises(ValueError, match="head dim D=264"):
        attention(*make_qkv(1, 1, 4, 4, 264, torch.float32)[:3])
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="q must have 4 dimension"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="k is on meta"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="key_bias must have shape"):
        attention(q, k, v, key_bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="key_bias is on meta"):
        attention(q, k, v, key_bias=torch.zeros(2, 6, device="meta"))
    with pytest.raises(TypeError, match="key_bias must be a floating"):
        attention(q, k, v, key_bias=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="scale must be a finite"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), k, v)


@pytest.mark.parametrize("d", [44, 264, 16])
def test_sdpa_fallback(d):
    q, k, v, kb, _ = make_qkv(2, 2, 7, 9, d, torch.float32, seed=11, bias="bk")
    assert is_supported(q, k, v) == (d == 16)
    out = attention_or_sdpa(q, k, v, key_bias=kb)
    torch.testing.assert_close(out, R.math_attention(q, k, v, key_bias=kb), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, key_bias=kb), out, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU

SD15_SHAPES = [  # (B, H, Lq, Lk, D): SD1.5 at 512x512 batch 2 (self and cross), SDXL at 1024 (D=64)
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160),
    (2, 10, 4096, 4096, 64), (2, 20, 1024, 77, 64),
]
ODD_SHAPES = [(1, 4, 1025, 1025, 80), (1, 2, 4097, 4097, 40), (2, 3, 333, 1025, 96), (1, 2, 77, 77, 128),
              (1, 2, 100, 300, 256), (1, 2, 50, 60, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SD15_SHAPES + ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_two_x_rule(shape, dtype):
    b, h, lq, lk, d = shape
    args = make_qkv(b, h, lq, lk, d, dtype, device="cuda", seed=lq + d, strided=(lq % 2 == 1),
                    bias="bk" if lk in (77, 1025) else None)
    assert_matches(run("triton", *args), *args)


@pytest.mark.gpu
def test_gpu_fabric_bias_per_head_and_fp32():
    args = make_qkv(2, 8, 1024, 1024 + 512, 80, torch.bfloat16, device="cuda", seed=1, strided=True, bias="bhk")
    assert_matches(run("triton", *args), *args)
    args = make_qkv(1, 2, 300, 500, 160, torch.float32, device="cuda", seed=2, strided=True, bias="bk")
    assert_matches(run("triton", *args), *args, fp32_rtol=1e-4)


@pytest.mark.gpu
def test_gpu_dispatch_default_is_triton():
    assert _backend.choose("attention", "cuda") == "triton"
    q, k, v, _, _ = make_qkv(1, 2, 128, 77, 40, torch.bfloat16, device="cuda")
    out = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert math.isfinite(out.float().sum().item())
