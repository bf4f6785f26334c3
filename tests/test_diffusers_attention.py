"""dbkernels.diffusers: FusedAttnProcessor gives AttnProcessor2_0's outputs and gradients.

A tiny UNet2DConditionModel built from a config with random weights (no downloads),
head dims 40 and 80 (SD1.5's), self- and cross-attention; fp32 on CPU with the
reference backend and the Triton kernels under the interpreter.
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import dbkernels  # noqa: E402
from dbkernels import diffusers as dbd  # noqa: E402

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(80, 160), norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,  # diffusers' name for the number of heads: D = 40 and 80
    cross_attention_dim=32,
)
N_ATTN_LAYERS = 2 * (2 + 4 + 1)  # (down 2 + up 4 + mid 1) transformer blocks x (self, cross)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def unet_inputs(seed=1, batch=2, text_len=13):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:batch])
    ctx = torch.randn(batch, text_len, 32, generator=g)
    return x, t, ctx


def step(unet, x, t, ctx, **kw):
    unet.zero_grad(set_to_none=True)
    out = unet(x, t, ctx, **kw).sample
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_same(a, b, rtol=1e-4, atol=1e-5):
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        scale = g_b[name].abs().max().item()
        err = (g_a[name] - g_b[name]).abs().max().item()
        assert err <= rtol * scale + atol, (name, err, scale)


def test_use_fused_attention_counts_and_installs():
    unet = tiny_unet()
    assert dbd.use_fused_attention(unet) == N_ATTN_LAYERS
    procs = set(map(id, unet.attn_processors.values()))
    assert len(procs) == 1 and isinstance(next(iter(unet.attn_processors.values())), dbd.FusedAttnProcessor)
    assert dbd.use_fused_attention(unet) == 0  # already installed
    heads_dims = {(m.heads, m.inner_dim // m.heads) for m in unet.modules() if isinstance(m, Attention)}
    assert heads_dims == {(2, 40), (2, 80)}


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unet_outputs_and_gradients_match_sdpa(backend, request):
    if backend == "triton":
        request.getfixturevalue("cpu_triton")
    unet = tiny_unet()
    # batch 1 under the interpreter keeps it at a few seconds (batches: tests/test_attention.py)
    x, t, ctx = unet_inputs(batch=2 if backend == "reference" else 1)
    expected = step(unet, x, t, ctx)
    fused = copy.deepcopy(unet)
    assert dbd.use_fused_attention(fused) == N_ATTN_LAYERS
    with dbkernels.force_backend(backend):
        got = step(fused, x, t, ctx)
    assert_same(got, expected)


def test_key_bias_via_cross_attention_kwargs(cpu_triton):
    """A callable bias per layer (FABRIC style) equals SDPA with the bias as an additive mask."""
    unet = tiny_unet()
    x, t, ctx = unet_inputs(batch=1)
    calls = []

    def bias_fn(attn, query_len, key_len):
        calls.append((query_len, key_len))
        if key_len != query_len:  # self-attention only
            return None
        return torch.linspace(-2.0, 1.0, key_len)[None, :]

    class BiasedSDPA(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     **kw):
            if encoder_hidden_states is None:
                n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * \
                    hidden_states.shape[3]
                attention_mask = torch.linspace(-2.0, 1.0, n)[None, None, :]
                # AttnProcessor2_0 runs prepare_attention_mask (repeats per head) then views as 4-D
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    ref = copy.deepcopy(unet)
    ref.set_attn_processor(BiasedSDPA())
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        dbd.use_fused_attention(unet)
        with dbkernels.force_backend("triton"):
            got = unet(x, t, ctx, cross_attention_kwargs={"key_bias": bias_fn}).sample
    assert len(calls) == N_ATTN_LAYERS
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_mask_falls_back_to_sdpa():
    unet = tiny_unet()
    x, t, ctx = unet_inputs()
    mask = torch.ones(2, 13)
    mask[1, 9:] = 0
    expected = step(unet, x, t, ctx, encoder_attention_mask=mask)
    fused = copy.deepcopy(unet)
    dbd.use_fused_attention(fused)
    got = step(fused, x, t, ctx, encoder_attention_mask=mask)
    assert_same(got, expected)


def test_unsupported_head_dim_is_one_line_once_and_uses_sdpa(capsys):
    torch.manual_seed(0)
    attn = Attention(query_dim=24, heads=2, dim_head=12, cross_attention_dim=16)  # D = 12
    attn.set_processor(AttnProcessor2_0())
    h = torch.randn(2, 10, 24)
    enc = torch.randn(2, 7, 16)
    expected = attn(h, enc)
    attn.set_processor(dbd.FusedAttnProcessor())   # installed by hand: said at the first call
    dbd._noted_head_dims.discard(12)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # a plain line, not a Python warning
        got = attn(h, enc)
        attn(h, enc)
        attn(h, enc)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "head dim 12 " in err and "scaled_dot_product_attention" in err, err
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_uncovered_head_dims_of_a_unet_are_named_once_in_one_line(capsys):
    """The built-in model has head dim 4 at its first level: every run used to print a
    two-line UserWarning for it. Now one line per process, when the processor goes in."""
    def make():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": (12, 16), "norm_num_groups": 4,
                                       "attention_head_dim": 2})   # D = 6 and 8: 6 is not covered
        unet.set_attn_processor(AttnProcessor2_0())
        return unet

    unet = make()
    x, t, ctx = unet_inputs()
    expected = step(unet, x, t, ctx)
    dbd._noted_head_dims.clear()
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dbd.use_fused_attention(unet)
        got = step(unet, x, t, ctx)
        step(unet, x, t, ctx)
        dbd.use_fused_attention(make())   # another model in the same process: said already
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dbkernels: head dim 6 (6 attention layers) not covered"), err
    assert "head dim 8" not in err
    assert_same(got, expected)


def test_4d_input_group_norm_residual_like_vae_attention():
    """The VAE-style Attention (4-D input, group_norm, residual, rescale) matches too."""
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True,
                     rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
    attn.set_processor(AttnProcessor2_0())
    h = torch.randn(2, 32, 5, 6)
    expected = attn(h)
    attn.set_processor(dbd.FusedAttnProcessor())
    torch.testing.assert_close(attn(h), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "sdxl-like"])
def test_bench_shape_derivation_matches_a_real_unet(name):
    """bench/attention.py derives the attention calls of a UNet forward from its config;
    a real diffusers UNet built from the same config makes exactly those calls."""
    import collections
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench import attention as bench_attn

    cfg = dict(bench_attn.QUICK_CONFIGS["tiny"])
    if name == "sdxl-like":
        cfg.update(resolution=128, batch=2, text_len=5, block_out_channels=(16, 32, 64),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 3))
    seen = collections.Counter()

    class Recorder(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *a, **kw):
            lq = hidden_states.shape[1]
            lk = lq if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            kind = "self" if encoder_hidden_states is None else "cross"
            d = attn.inner_dim // attn.heads
            seen[bench_attn.AttnShape(kind, hidden_states.shape[0], attn.heads, lq, lk, d)] += 1
            return super().__call__(attn, hidden_states, encoder_hidden_states, *a, **kw)

    torch.manual_seed(0)
    side = cfg["resolution"] // cfg["vae_scale_factor"]
    unet = UNet2DConditionModel(
        sample_size=side, in_channels=4, out_channels=4, layers_per_block=cfg["layers_per_block"],
        block_out_channels=cfg["block_out_channels"], norm_num_groups=8,
        down_block_types=cfg["down_block_types"], up_block_types=cfg["up_block_types"],
        attention_head_dim=cfg["attention_head_dim"],
        transformer_layers_per_block=cfg["transformer_layers_per_block"], cross_attention_dim=8)
    unet.set_attn_processor(Recorder())
    with torch.no_grad():
        unet(torch.randn(cfg["batch"], 4, side, side), torch.tensor([1] * cfg["batch"]),
             torch.randn(cfg["batch"], cfg["text_len"], 8))
    assert seen == bench_attn.unet_attention_calls(cfg)
    if name == "tiny":
        sd15 = bench_attn.unet_attention_calls(bench_attn.UNET_CONFIGS["sd15"])
        assert sum(n for s, n in sd15.items() if s.kind == "self") == 16
        assert sum(n for s, n in sd15.items() if s.kind == "cross") == 16
        assert {(s.lq, s.head_dim) for s in sd15} == {(4096, 40), (1024, 80), (256, 160), (64, 160)}


def test_processor_compiles_fullgraph():
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32, cross_attention_dim=16)
    h = torch.randn(2, 10, 64)
    enc = torch.randn(2, 7, 16)
    expected = attn(h, enc)
    attn.set_processor(dbd.FusedAttnProcessor())
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    out = compiled(h, enc)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert attn.to_q.weight.grad is not None
