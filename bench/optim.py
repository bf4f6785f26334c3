"""Benchmark suite `optim` (op `adamw8bit`): one optimizer step over the SD1.5 UNet, AdamW8bit and AdamW4bit.

The parameter set is the full Stable Diffusion 1.5 UNet (shapes from diffusers'
UNet2DConditionModel with the SD1.5 config, built on the meta device: 686 tensors,
860M parameters), random values, bf16 or fp32 parameters, random gradients of the
parameter dtype. --quick uses a small set of odd shapes instead (CPU smoke runs).

Providers
  dbkernels-cuda       dbkernels.optim.AdamW8bit, force_backend("cuda"): one multi-tensor launch
  dbkernels-triton     the same, force_backend("triton"): one launch per tensor
  dbkernels-reference  the PyTorch reference (the CPU path)
  dbkernels4-*         dbkernels.optim.AdamW4bit with the same three backends
  torch                torch.optim.AdamW (its default: foreach), states in the parameter dtype
  torch-fused          torch.optim.AdamW(fused=True), states in the parameter dtype
  bnb                  bitsandbytes.optim.AdamW8bit (if installed)
  torchao              torchao.optim.AdamW8bit (if installed)
  torchao4             torchao.optim.AdamW4bit (if installed)

Rows: mode "step", ms p20/p50/p80 of opt.step() (states initialised by a first step),
GB/s from a bytes model (read p, g, states; write p, states:
numel * 3 * sizeof(param) + 2 * state bytes), fraction of the device's peak bandwidth,
extras.state_bytes_per_param. The dbkernels providers are checked against the
reference on a few tensors before timing. With --memory (default on CUDA, not with
--quick) rows of mode "train-step" give the peak memory of one training step of the
SD1.5 UNet (bf16 weights, batch 1, 64x64 latents, AdamW8bit CUDA) with and without
step_in_backward. Rows of mode "state-bytes" (with the SD1.5 shapes, the default; meta tensors, no time): the bytes of AdamW8bit's and
AdamW4bit's states over the whole SD1.5 and SDXL UNets, from their state_bytes(), per parameter.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
from typing import Any, Callable

import torch

from . import common

OP = "adamw8bit"
ALIASES = ("optim", "adamw8bit")
ALL_PROVIDERS = ("dbkernels-cuda", "dbkernels-triton", "dbkernels-reference", "dbkernels4-cuda", "dbkernels4-triton",
                 "dbkernels4-reference", "torch", "torch-fused", "bnb", "torchao", "torchao4")
GPU_DEFAULT_PROVIDERS = ("torch-fused", "bnb", "torchao", "torchao4", "dbkernels-triton", "dbkernels-cuda",
                         "dbkernels4-triton", "dbkernels4-cuda")
CPU_DEFAULT_PROVIDERS = ("torch", "dbkernels-reference", "dbkernels4-reference")
QUICK_SHAPES = [(320, 4, 3, 3), (320,), (1280, 320), (77, 33), (5003,)]

SD15_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


class Skip(Exception):
    pass


def sd15_unet(device="meta", dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_CONFIG).to(dtype)


def sd15_shapes() -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in sd15_unet("meta").parameters()]


def tiny_world_shapes() -> list[tuple[int, ...]]:
    from diffusers import UNet2DConditionModel

    from trainer.options.sampling import BUILTIN_MODEL

    config = UNet2DConditionModel.load_config(BUILTIN_MODEL / "unet")
    with torch.device("meta"):
        return [tuple(p.shape) for p in UNet2DConditionModel.from_config(config).parameters()]


def make_params(shapes, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params, grads = [], []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, device=device, dtype=torch.float32).mul_(0.02).to(dtype))
        params.append(p)
        grads.append(torch.randn(s, generator=g, device=device, dtype=torch.float32).mul_(1e-3).to(dtype))
    return params, grads


def _optimizer_class(provider: str):
    import dbkernels.optim

    return dbkernels.optim.AdamW4bit if provider.startswith("dbkernels4") else dbkernels.optim.AdamW8bit


def _dbk(backend: str, provider: str):
    def make(params):
        return _optimizer_class(provider)(params, lr=1e-4), lambda: __import__("dbkernels").force_backend(backend)
    return make


def _torch_fused(params):
    if params[0].device.type != "cuda":
        raise Skip("fused=True needs CUDA tensors")
    return torch.optim.AdamW(params, lr=1e-4, fused=True), contextlib.nullcontext


def _bnb(params):
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"bitsandbytes not importable ({type(exc).__name__})") from exc
    return bnb.optim.AdamW8bit(params, lr=1e-4), contextlib.nullcontext


def _torchao(cls: str):
    def make(params):
        try:
            mod = importlib.import_module("torchao.optim")
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"torchao not importable ({type(exc).__name__})") from exc
        return getattr(mod, cls)(params, lr=1e-4), contextlib.nullcontext
    return make


PROVIDERS: dict[str, Callable] = {
    **{f"{prefix}-{b}": _dbk(b, prefix) for prefix in ("dbkernels", "dbkernels4")
       for b in ("cuda", "triton", "reference")},
    "torch": lambda params: (torch.optim.AdamW(params, lr=1e-4), contextlib.nullcontext),
    "torch-fused": _torch_fused,
    "bnb": _bnb,
    "torchao": _torchao("AdamW8bit"),
    "torchao4": _torchao("AdamW4bit"),
}


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                total += v.numel() * v.element_size()
            elif hasattr(v, "__tensor_flatten__"):  # torchao's quantized subclasses
                names, _ = v.__tensor_flatten__()
                total += sum(getattr(v, n).numel() * getattr(v, n).element_size() for n in names)
    return total


def check_against_reference(name: str, dtype, device) -> str:
    """One step of a few tensors vs the reference; returns 'ok' or raises AssertionError."""
    from dbkernels import force_backend

    cls = _optimizer_class(name)
    shapes = [(1280, 320), (5003,), (320,)]
    outs = []
    for backend in ("reference", name.split("-", 1)[1]):
        params, grads = make_params(shapes, dtype, device, seed=3)
        params = [torch.nn.Parameter(p.detach().cpu().to(device)) for p in params]
        opt = cls(params, lr=1e-3, **{("min_4bit_size" if "4" in cls.__name__ else "min_8bit_size"): 1000})
        with force_backend(backend):
            for _ in range(2):
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
        outs.append(([p.detach().float().cpu() for p in params], opt, params))
    (ra, oa, pa), (rb, ob, pb) = outs
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    for a, b in zip(ra, rb):
        err = ((a - b).abs() / (a.abs() + 1e-3)).max().item()
        assert err <= 2 * tol, f"param rel err {err:.3g} > {2 * tol:.3g}"
    for p_a, p_b in zip(pa, pb):
        sa, sb = oa.state[p_a], ob.state[p_b]
        if "state1" in sa:
            flips = sum(int((sa[k].cpu() != sb[k].cpu()).sum()) for k in ("state1", "state2"))
            assert flips <= max(8, p_a.numel() // 10000), f"{flips} state code flips"
    return "ok"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", choices=("sd15-unet", "quick", "tiny-world-unet"), default=None,
                        help="the parameter set: SD1.5's UNet (default), a few odd shapes (default with --quick), or "
                             "the built-in model's UNet (3.2M parameters: the CPU step of a demo run)")
    parser.add_argument("--memory", choices=("auto", "on", "off"), default="auto",
                        help="peak memory of an SD1.5 UNet training step with/without step_in_backward "
                             "(auto: on for CUDA without --quick)")


def _bytes_model(numel: int, esize: int, sbytes: int) -> int:
    return numel * 3 * esize + 2 * sbytes


def run(opts: argparse.Namespace, writer: common.ResultWriter) -> int:
    device: torch.device = opts.device
    dtypes = opts.dtypes or [torch.bfloat16, torch.float32]
    names = list(opts.providers or (GPU_DEFAULT_PROVIDERS if device.type == "cuda" else CPU_DEFAULT_PROVIDERS))
    unknown = [n for n in names if n not in ALL_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {list(ALL_PROVIDERS)}")
    common.use_triton_interpreter_on_cpu(device, names)
    shape_name = getattr(opts, "shapes", None) or ("quick" if opts.quick else "sd15-unet")
    shapes = {"quick": lambda: QUICK_SHAPES, "sd15-unet": sd15_shapes, "tiny-world-unet": tiny_world_shapes}[shape_name]()
    numel = sum(math.prod(s) for s in shapes)
    budget = common.QUICK_BUDGET if opts.quick else common.TimingBudget(warmup_ms=100.0, rep_ms=500.0)
    env = common.environment(device)
    print(f"[bench {OP}] device={env['device']} torch={env['torch']} triton={env['triton']} cuda={env['cuda']} "
          f"git={env['git_sha']} params={numel / 1e6:.1f}M in {len(shapes)} tensors providers={','.join(names)}")
    failures, skipped, rows = [], {}, []
    for dtype in dtypes:
        for name in names:
            if name in skipped:
                continue
            label = f"{name} {common.dtype_name(dtype)}"
            try:
                check = check_against_reference(name, dtype, device) if name.startswith("dbkernels") else None
                params, grads = make_params(shapes, dtype, device)
                opt, ctx = PROVIDERS[name](params)
                with ctx():
                    for p, g in zip(params, grads):
                        p.grad = g
                    opt.step()  # initialise the states

                    def step():
                        opt.step()

                    ms = common.time_ms(step, device, budget)
                sbytes = state_bytes(opt)
                row = common.make_row(
                    op=OP, provider=name, shape=[numel], dtype=dtype, mode="step", variant=shape_name, ms=ms,
                    env=env, bytes_moved=_bytes_model(numel, params[0].element_size(), sbytes),
                    extras={"num_tensors": len(shapes), "numel": numel, "state_bytes": sbytes,
                            "state_bytes_per_param": sbytes / numel, "check": check})
                writer.write(row)
                rows.append(row)
                print(f"  {label}: {ms[1]:.3f} ms  state {sbytes / numel:.3f} B/param"
                      + (f"  {row['gbps']:.0f} GB/s" if row["gbps"] else "")
                      + (f" ({100 * row['frac_peak_bw']:.0f}% of peak)" if row["frac_peak_bw"] else ""))
                del opt, params, grads
            except Skip as exc:
                skipped[name] = str(exc)
                print(f"  skip {name}: {exc}")
            except AssertionError as exc:
                failures.append(f"WRONG RESULT, skipped: {label}: {exc}")
                print(f"  {failures[-1]}")
            except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the others
                if type(exc).__name__ == "BackendUnavailable":
                    skipped[name] = str(exc)
                    print(f"  skip {name}: {exc}")
                else:
                    failures.append(f"ERROR, skipped: {label}: {type(exc).__name__}: {exc}")
                    print(f"  {failures[-1]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if shape_name == "sd15-unet":  # the whole-UNet run: its state bytes, and SDXL's
        for row in state_bytes_rows(env):
            writer.write(row)
    memory = opts.memory == "on" or (opts.memory == "auto" and device.type == "cuda" and not opts.quick)
    if memory:
        try:
            for row in train_step_memory(device, env):
                writer.write(row)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"ERROR in the train-step memory rows: {type(exc).__name__}: {exc}")
            print(f"  {failures[-1]}")
    if skipped:
        print("skipped providers: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if failures:
        print(f"{len(failures)} failure(s); their rows were not written")
        return 1
    return 0


def state_bytes_rows(env: dict[str, Any]) -> list[dict[str, Any]]:
    """Bytes of AdamW8bit's and AdamW4bit's states over the SD1.5 and SDXL UNets (their configs in
    trainer/memory/arch_configs, built on the meta device: the states are created, nothing is allocated), read
    from the optimizers' own state_bytes()."""
    from diffusers import UNet2DConditionModel

    from dbkernels.optim import AdamW4bit, AdamW8bit
    from trainer.memory.estimate import model_configs

    rows = []
    for arch in ("sd15", "sdxl"):
        config = {k: v for k, v in model_configs(arch=arch)["unet"].items() if not k.startswith("_")}
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        params = list(unet.parameters())
        numel = sum(p.numel() for p in params)
        for cls in (AdamW8bit, AdamW4bit):
            opt = cls(params, lr=1e-4)
            group = opt.param_groups[0]
            for i, p in enumerate(params):
                opt._init_state(p, group, i)
            sbytes = opt.state_bytes()
            row = common.make_row(
                op=OP, provider=f"dbkernels{'4' if cls is AdamW4bit else ''}-state", shape=[numel],
                dtype=torch.float32, mode="state-bytes", variant=f"{arch}-unet", ms=(0.0, 0.0, 0.0), env=env,
                extras={"optimizer": cls.__name__, "num_tensors": len(params), "numel": numel,
                        "state_bytes": sbytes, "state_bytes_per_param": sbytes / numel,
                        "block_size": group["block_size"]})
            rows.append({**row, "ms_p20": None, "ms_p50": None, "ms_p80": None})  # counted, not timed
            print(f"  {arch} UNet ({numel / 1e6:.0f}M params): {cls.__name__} state {sbytes / 2**30:.2f} GiB, "
                  f"{sbytes / numel:.3f} B/param")
    return rows


def train_step_memory(device: torch.device, env: dict[str, Any]) -> list[dict[str, Any]]:
    """Peak memory of one SD1.5 UNet training step (bf16 weights, AdamW8bit), with and
    without step_in_backward (second step measured: states exist in both)."""
    from dbkernels.optim import AdamW8bit, step_in_backward

    if device.type != "cuda":
        raise Skip("peak memory needs CUDA")
    model = sd15_unet(device, torch.bfloat16)
    model.enable_gradient_checkpointing() if hasattr(model, "enable_gradient_checkpointing") else None
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=g, device=device, dtype=torch.bfloat16)
    ctx = torch.randn(1, 77, 768, generator=g, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500], device=device)
    numel = sum(p.numel() for p in model.parameters())
    out = []
    for variant in ("plain", "step_in_backward"):
        opt = AdamW8bit(model.parameters(), lr=1e-6)
        handle = step_in_backward(model, opt) if variant == "step_in_backward" else None

        def train_step():
            loss = model(x, t, encoder_hidden_states=ctx).sample.float().square().mean()
            loss.backward()
            if handle is None:
                opt.step()
                opt.zero_grad(set_to_none=True)

        train_step()
        peak = common.peak_bytes(train_step, device)
        ms = common.time_ms(train_step, device, common.QUICK_BUDGET)
        out.append(common.make_row(
            op=OP, provider="dbkernels-cuda" if __import__("dbkernels")._backend.choose("adamw8bit", "cuda") == "cuda"
            else "dbkernels-triton", shape=[1, 4, 64, 64], dtype=torch.bfloat16, mode="train-step", variant=variant,
            ms=ms, env=env, peak_mem=peak,
            extras={"numel": numel, "grad_bytes": 2 * numel, "gradient_checkpointing": True}))
        print(f"  train step {variant}: peak {peak / 2**30:.2f} GiB, {ms[1]:.1f} ms")
        if handle is not None:
            handle.remove()
        del opt
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return out
