"""AdamW4bit on the CUDA kernel of csrc/adamw8bit.cu (launches with state_bits=4), compiled for the host by
g++ against the CUDA emulation of test_adamw8bit_cuda_emu.py, bit-exact against dbkernels.optim.reference4;
a row whose format disagrees with its launch is left alone; and the FourBit glue of dbkernels/optim/cuda.py
driving that emulated kernel.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch

from dbkernels.optim import AdamW4bit, quant, quant4, reference, reference4
from dbkernels.optim import cuda as C
from test_adamw8bit_cuda_emu import emu_lib  # noqa: F401 - the module-scoped fixture (g++ build)

ROOT = Path(__file__).resolve().parents[1]
HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _emu_launch(lib, meta, cta, dtype_code, block_size, scalars, step, sr, state_bits, want_rc=0):
    """One emulated cuda_adamw8bit_step over the rows of `meta` (CPU tensors)."""
    sc = torch.tensor(scalars, dtype=torch.float32)
    mis = ctypes.c_long(0)
    P = ctypes.c_void_p
    rc = lib.emu_step(P(meta.data_ptr()), P(cta.data_ptr()), ctypes.c_int64(cta.numel()), dtype_code, block_size,
                      P(sc.data_ptr()), ctypes.c_uint32(step), int(sr), state_bits, ctypes.byref(mis))
    assert rc == want_rc, f"cudaError_t {rc}"
    assert mis.value == 0, "misaligned vector access (would fault on a GPU)"


def _table(entries, block_size, state_bits):
    """meta and cta_tensor (CPU) of one launch over (p, g, state) entries."""
    rows, ctas, first = [], [], 0
    for p, g, s in entries:
        rows.append(C._row(p, g, s, first, state_bits))
        ctas.append(C.num_ctas(p.numel(), block_size))
        first += ctas[-1]
    cta = torch.repeat_interleave(torch.arange(len(ctas), dtype=torch.int32), torch.tensor(ctas, dtype=torch.int64))
    return torch.tensor(rows, dtype=torch.int64), cta


def _offset_view(n: int, dtype, byte_offset: int, fill) -> torch.Tensor:
    """n elements of `dtype` starting `byte_offset` bytes into a fresh storage, filled with fill(n)."""
    es = torch.empty(0, dtype=dtype).element_size()
    assert byte_offset % es == 0
    t = torch.zeros(n + byte_offset // es + 8, dtype=dtype)[byte_offset // es:][:n]
    t.copy_(fill(n))
    return t


# (numel, state format, state_bits of its launch, param byte offset, state byte offset). "4": 4-bit,
# "8": 8-bit, "32": fp32 moments (in a launch of either format). A step is two launches, one per
# format (the kernel is built per format). Odd sizes and sizes off a multiple of 128 end in a partial
# block (scalar path, a half-used last byte); a param offset of one element or a state offset of 1
# byte clears the aligned flag (scalar path everywhere); a 4-bit state at 2 bytes (not 4) stays on
# the vector path.
TABLE = [(3000, "4", 4, 0, 0), (5037, "4", 4, 0, 0), (2048, "4", 4, 0, 2), (1543, "4", 4, 0, 1),
         (777, "4", 4, "elem", 0), (1999, "8", 8, 0, 0), (100, "32", 4, 0, 0), (33, "32", 8, "elem", 0),
         (1, "4", 4, 0, 0)]


def _make_case(dtype, block_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randn(n, generator=gen)  # noqa: E731
    items = []
    for i, (n, fmt, _, p_off, s_off) in enumerate(TABLE):
        es = torch.empty(0, dtype=dtype).element_size()
        p = _offset_view(n, dtype, es if p_off == "elem" else 0, lambda k: rnd(k).to(dtype))
        state = {"seed": reference.fmix32_int(1000 + i), "step": 0}
        nb = quant.num_blocks(n, block_size)
        if fmt == "32":
            state["exp_avg"] = rnd(n) * 1e-2
            state["exp_avg_sq"] = rnd(n).abs() * 1e-4
        else:
            # A resumed state (every code, -0 included, and junk in an odd size's padding nibble):
            # the first step decodes what the kernel must read, not just zeros.
            nbytes = quant4.packed_bytes(n) if fmt == "4" else n
            for j in (1, 2):
                codes = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.int32).to(torch.uint8)
                state[f"state{j}"] = _offset_view(nbytes, torch.uint8, s_off, lambda k, c=codes: c)
                state[f"absmax{j}"] = rnd(nb).abs() * (1e-2 if j == 1 else 1e-4)
        items.append((fmt, p, state))
    return items


def _clone_state(s):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}


def _ref_update(fmt, p, g, state, group, step):
    mod = reference if fmt == "8" else reference4
    mod.update_(p, g, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"], step=step, block_size=group["block_size"],
                stochastic_rounding=group["stochastic_rounding"])


# (dtype, block size, stochastic rounding): the flag only matters for bf16; block 1024 (K = 8) once.
KERNEL_CASES = [(torch.float32, 128, True), (torch.float32, 256, True), (torch.float16, 128, True),
                (torch.float16, 256, True), (torch.bfloat16, 128, True), (torch.bfloat16, 128, False),
                (torch.bfloat16, 256, True), (torch.bfloat16, 256, False), (torch.bfloat16, 1024, True)]


@pytest.mark.parametrize("dtype,block_size,sr", KERNEL_CASES,
                         ids=[f"{str(d)[6:]}-{b}-{'sr' if s else 'nearest'}" for d, b, s in KERNEL_CASES])
def test_emulated_kernel_4bit_rows_match_reference4_bitwise(emu_lib, dtype, block_size, sr):  # noqa: F811
    items = _make_case(dtype, block_size)
    ref = [(fmt, p.clone(), _clone_state(s)) for fmt, p, s in items]
    group = dict(HP, block_size=block_size, stochastic_rounding=sr)
    gen = torch.Generator().manual_seed(7)
    for step in (1, 2, 3):
        grads = [(torch.randn(p.numel(), generator=gen) * 3).to(dtype) for _, p, _ in items]
        for g in grads:
            g[::7] = 0  # with a code 0 or 8 (-0), m is exactly +0: its code must be 0, not 8
        flags = {}
        for bits in (4, 8):
            idx = [i for i, row in enumerate(TABLE) if row[2] == bits]
            meta, cta = _table([(items[i][1], grads[i], items[i][2]) for i in idx], block_size, bits)
            flags.update(zip(idx, (int(f) >> 32 for f in meta[:, 8])))
            _emu_launch(emu_lib, meta, cta, C.DTYPE_CODE[dtype], block_size, C._hyper_args(group, step), step,
                        sr and dtype == torch.bfloat16, bits)
        for (fmt, p, s), g in zip(ref, grads):
            _ref_update(fmt, p, g, s, group, step)
    flags = [flags[i] for i in range(len(TABLE))]
    assert [bool(f & C.FLAG_ALIGNED) for f in flags] == [True, True, True, False, False, True, True, False, True]
    assert [f & (C.FLAG_QUANT | C.FLAG_4BIT) for f in flags] == [5, 5, 5, 5, 5, 1, 0, 0, 5]
    for i, ((fmt, p, s), (_, rp, rs)) in enumerate(zip(items, ref)):
        assert torch.equal(p, rp), (i, fmt, (p.float() - rp.float()).abs().max())
        for k, v in rs.items():
            got = s[k]
            if isinstance(v, torch.Tensor):
                assert torch.equal(got, v), (i, fmt, k, int((got != v).sum()))
            else:
                assert got == v
    # The codes moved (a kernel that skipped the state write could not pass on zeros alone).
    codes = items[1][2]["state1"]
    assert 8 <= len(torch.unique(codes & 15)) and 8 <= len(torch.unique(codes >> 4))


def _quant_state(n, block_size, bits, gen, guard):
    """A resumed `bits`-bit state whose code tensors are the head of a buffer `guard` bytes longer."""
    nbytes = quant4.packed_bytes(n) if bits == 4 else n
    state = {"seed": 77 + bits, "step": 0}
    for j in (1, 2):
        buf = torch.randint(0, 256, (nbytes + guard,), generator=gen, dtype=torch.int32).to(torch.uint8)
        state[f"state{j}"], state[f"buf{j}"] = buf[:nbytes], buf
        state[f"absmax{j}"] = torch.rand(quant.num_blocks(n, block_size), generator=gen) * 1e-2
    return state


def test_emulated_kernel_leaves_a_row_of_the_other_format_alone(emu_lib):  # noqa: F811
    """A quantized row in a launch of the other state_bits (a glue bug) is skipped: not read as the
    launch's format, nothing written (an 8-bit write of a 4-bit row would run n - ceil(n / 2) bytes
    past its state); the other rows of the launch are still updated bit-exactly."""
    dtype, bs, n = torch.bfloat16, 128, 1001  # 7 full blocks (vector path) and a partial one
    group = dict(HP, block_size=bs, stochastic_rounding=True)
    gen = torch.Generator().manual_seed(11)
    for launch_bits, other_bits in ((8, 4), (4, 8)):
        good_p, f32_p, wrong_p = (torch.randn(k, generator=gen).to(dtype) for k in (n, 100, n))
        good = _quant_state(n, bs, launch_bits, gen, guard=0)
        f32 = {"seed": 5, "exp_avg": torch.randn(100, generator=gen) * 1e-2, "exp_avg_sq": torch.rand(100) * 1e-4}
        wrong = _quant_state(n, bs, other_bits, gen, guard=n)
        grads = [torch.randn(k, generator=gen).to(dtype) for k in (n, 100, n)]
        entries = [(good_p, grads[0], good), (f32_p, grads[1], f32)]
        refs = [(str(launch_bits), good_p.clone(), _clone_state(good)), ("8", f32_p.clone(), _clone_state(f32))]
        before = (wrong_p.clone(), _clone_state(wrong))
        meta, cta = _table(entries, bs, launch_bits)
        # The wrong row as the glue of its own format builds it (sizes checked, flagged for other_bits),
        # its CTAs after the others'.
        wrong_row = C._row(wrong_p, grads[2], wrong, cta.numel(), other_bits)
        assert wrong_row[8] >> 32 & C.FLAG_4BIT == (C.FLAG_4BIT if other_bits == 4 else 0)
        meta = torch.cat([meta, torch.tensor([wrong_row], dtype=torch.int64)])
        cta = torch.cat([cta, torch.full((C.num_ctas(n, bs),), 2, dtype=torch.int32)])
        _emu_launch(emu_lib, meta, cta, C.DTYPE_CODE[dtype], bs, C._hyper_args(group, 1), 1, True, launch_bits)
        assert torch.equal(wrong_p, before[0]), (launch_bits, "the skipped row's param changed")
        for k in ("buf1", "buf2", "absmax1", "absmax2"):  # buf: the state and the bytes after it
            assert torch.equal(wrong[k], before[1][k]), (launch_bits, k)
        for (fmt, rp, rs), (p, g, st) in zip(refs, entries):
            _ref_update(fmt, rp, g, rs, group, 1)
            assert torch.equal(p, rp), (launch_bits, fmt)
            for k in ("state1", "absmax1", "state2", "absmax2", "exp_avg", "exp_avg_sq"):
                if k in st:
                    assert torch.equal(st[k], rs[k]), (launch_bits, fmt, k)
    # A state_bits the kernel does not know is refused before any launch.
    meta, cta = _table(entries[:1], bs, launch_bits)
    kept = _clone_state(good)
    _emu_launch(emu_lib, meta, cta, C.DTYPE_CODE[dtype], bs, C._hyper_args(group, 1), 1, True, 2, want_rc=1)
    assert all(torch.equal(good[k], kept[k]) for k in ("state1", "absmax1"))


def test_flags_and_state_formats_agree_with_the_header():
    h = (ROOT / "csrc" / "adamw8bit.h").read_text()
    consts = {k: int(eval(v)) for k, v in re.findall(r"constexpr int64_t (kAdamW\w+) = ([\d |]+);", h)}  # noqa: S307
    assert consts == {"kAdamWQuant": C.FLAG_QUANT, "kAdamWAligned": C.FLAG_ALIGNED, "kAdamW4bit": C.FLAG_4BIT,
                      "kAdamWStateFormats": 8 | 4}
    ops = (ROOT / "csrc" / "adamw8bit_ops.cpp").read_text()
    schema = re.search(r'm\.def\("(cuda_adamw_state_formats[^"]*)"', ops).group(1)
    assert str(torch._C.parse_schema("dbkernels::" + schema)) == "dbkernels::cuda_adamw_state_formats() -> int"
    # state_bits is the step's last argument, defaulting to 8: the 8-bit glue leaves it out.
    defs = ["".join(re.findall(r'"([^"]*)"', c)) for c in re.findall(r'm\.def\(\s*((?:"[^"]*"\s*)+)', ops)]
    step = torch._C.parse_schema("dbkernels::" + next(d for d in defs if d.startswith("cuda_adamw8bit_step(")))
    last = step.arguments[-1]
    assert (step.name, last.name, str(last.type), last.default_value) == \
        ("dbkernels::cuda_adamw8bit_step", "state_bits", "int", 8)


def test_unavailable_reason_for_4bit_needs_a_build_with_the_format(monkeypatch):
    class Old:  # an extension built before the 4-bit format
        cuda_adamw8bit_step = object()

    class New(Old):
        @staticmethod
        def cuda_adamw_state_formats():
            return 8 | 4

    monkeypatch.setattr(C._ext, "unavailable_reason", lambda: None)
    monkeypatch.setattr(C._ext, "load", lambda: Old)
    assert C.unavailable_reason() is None and C.unavailable_reason(bits=8) is None
    why = C.unavailable_reason(bits=4)
    assert "predates the 4-bit" in why and "rebuild" in why
    monkeypatch.setattr(C._ext, "load", lambda: New)
    assert C.unavailable_reason(bits=4) is None
    monkeypatch.setattr(C._ext, "load", lambda: type("NoStep", (), {}))
    assert "cuda_adamw8bit_step is missing" in C.unavailable_reason(bits=4)
    with pytest.raises(ValueError, match="bits must be one of"):
        C.unavailable_reason(bits=2)


def test_row_refuses_a_state_of_another_format():
    p, g = torch.zeros(300), torch.zeros(300)
    s4 = {"seed": 1, "state1": torch.zeros(150, dtype=torch.uint8), "state2": torch.zeros(150, dtype=torch.uint8),
          "absmax1": torch.zeros(3), "absmax2": torch.zeros(3)}
    assert C._row(p, g, s4, 0, state_bits=4)[8] >> 32 == C.FLAG_QUANT | C.FLAG_4BIT | C.FLAG_ALIGNED
    with pytest.raises(ValueError, match="8-bit optimizer state .* must have 300 elements"):
        C._row(p, g, s4, 0)
    s8 = {**s4, "state1": torch.zeros(300, dtype=torch.uint8), "state2": torch.zeros(300, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="4-bit optimizer state .* must have 150 elements"):
        C._row(p, g, s8, 0, state_bits=4)


class _FakeOps:
    """torch.ops.dbkernels with the step running on the emulated kernel (CPU tensors)."""

    def __init__(self, lib):
        self.lib, self.launches = lib, []

    def cuda_adamw8bit_step(self, meta, cta_tensor, dtype, bs, b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2,
                            decay, step, sr, state_bits=8):
        self.launches.append((meta.shape[0], dtype, state_bits, tuple(int(r[8]) >> 32 & C.FLAG_4BIT for r in meta)))
        _emu_launch(self.lib, meta, cta_tensor, dtype, bs, [b1, omb1, b2, omb2, eps, step_size, inv_sqrt_bc2, decay],
                    step, sr, state_bits)

    @staticmethod
    def cuda_adamw_state_formats():
        return 8 | 4


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(n, generator=gen).to(torch.bfloat16) for n in (3000, 100, 2049)]
    base.append(torch.randn(778, generator=gen).to(torch.bfloat16)[1:])  # storage offset 1: scalar path
    base.append(torch.randn(1501, generator=gen))  # fp32: a second launch
    return base


def test_four_bit_glue_with_emulated_kernel(emu_lib, monkeypatch):  # noqa: F811
    """FourBit.multi_tensor_step through AdamW4bit.step (table build, cache, grad-pointer refresh, one launch
    per dtype group) against AdamW4bit on the reference backend."""
    import dbkernels
    from dbkernels.optim import adamw4bit as A4

    base = _params()
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(b.shape, generator=gen).to(b.dtype) for b in base] for _ in range(3)]
    kw = dict(HP, min_4bit_size=500, block_size=128)
    ref_params = [torch.nn.Parameter(b.clone()) for b in base]
    ref_opt = AdamW4bit(ref_params, **kw)
    with dbkernels.force_backend("reference"):
        for gs in grads:
            for p, g in zip(ref_params, gs):
                p.grad = g.clone()
            ref_opt.step()

    fake = _FakeOps(emu_lib)
    monkeypatch.setattr(C._ext, "load", lambda: fake)
    monkeypatch.setattr(A4, "_impl", lambda device, block_size: ("cuda", C.FourBit))
    params = [torch.nn.Parameter(b.clone()) for b in base]
    opt = AdamW4bit(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()  # new addresses every step: the cached table refreshes its grad column
        opt.step()
    f4 = C.FLAG_4BIT
    # state_bits 4 per launch; fp32-state rows carry no 4-bit flag
    assert fake.launches == [(4, 2, 4, (f4, 0, f4, f4)), (1, 0, 4, (f4,))] * 3
    assert len(opt._cuda_cache) == 2
    for i, (a, b) in enumerate(zip(ref_params, params)):
        assert torch.equal(a, b), i
        sa, sb = ref_opt.state[a], opt.state[b]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], (i, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_four_bit_update_one_parameter_with_emulated_kernel(emu_lib, monkeypatch, dtype):  # noqa: F811
    """FourBit.update_ (step_in_backward's per-parameter call): a one-row table launch."""
    fake = _FakeOps(emu_lib)
    monkeypatch.setattr(C._ext, "load", lambda: fake)
    gen = torch.Generator().manual_seed(3)
    n, bs = 2001, 256
    p = torch.randn(n, generator=gen).to(dtype)
    nb, nbytes = quant.num_blocks(n, bs), quant4.packed_bytes(n)
    state = {"seed": 12345, "state1": torch.zeros(nbytes, dtype=torch.uint8), "absmax1": torch.zeros(nb),
             "state2": torch.zeros(nbytes, dtype=torch.uint8), "absmax2": torch.zeros(nb)}
    rp, rstate = p.clone(), _clone_state(state)
    for step in (1, 2, 3):
        g = torch.randn(n, generator=gen).to(dtype)
        args = dict(HP, step=step, block_size=bs, stochastic_rounding=True)
        C.FourBit.update_(p, g, state, **args)
        reference4.update_(rp, g, rstate, **args)
    assert fake.launches == [(1, C.DTYPE_CODE[dtype], 4, (C.FLAG_4BIT,))] * 3
    assert torch.equal(p, rp)
    for k in ("state1", "absmax1", "state2", "absmax2"):
        assert torch.equal(state[k], rstate[k]), k
