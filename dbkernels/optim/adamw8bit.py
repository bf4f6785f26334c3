"""AdamW8bit: AdamW with blockwise 8-bit states (dbkernels.optim.quant) and fused steps.

Backends (dispatcher op "adamw8bit"): `cuda` = one multi-tensor launch per
(param group, device, dtype, step) over every parameter of it (csrc/adamw8bit.cu),
`triton` = one launch per parameter (triton_kernels.py), `reference` = PyTorch
(reference.py, the spec). On CPU tensors the reference case runs multi_tensor.py: all
tensors of a (param group, dtype, step) at once in cache-sized chunks, bitwise equal
to reference.py (step_in_backward's single-tensor updates keep reference.py). All
compute the same fp32 operations.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .. import _backend
from . import multi_tensor, quant, reference
from .reference import fmix32_int

_backend.register_op("adamw8bit", ("cuda", "triton", "reference"))

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_BLOCK_SIZES = (128, 256, 512, 1024)  # what csrc/adamw8bit.cu is instantiated for
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 32, 4096
_SEED_BASE = 0x5EED0AD8


def _param_seed(index: int) -> int:
    """Per-parameter stochastic-rounding seed (uint32) from its position in the optimizer."""
    return fmix32_int(_SEED_BASE ^ fmix32_int(index * 0x632BE5AB + 1))


def _check_param(p, where: str) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{where}: parameters must be torch.Tensor, got {type(p).__name__}")
    if p.is_complex():
        raise TypeError(f"{where}: complex parameters are not supported by AdamW8bit (got {p.dtype}); "
                        "optimize torch.view_as_real(p) instead")
    if p.dtype not in PARAM_DTYPES:
        raise TypeError(f"{where}: parameter dtype must be float32, bfloat16 or float16, got {p.dtype}")


def choose_backend(op: str, device: torch.device, block_size: int, *, bits: int, reference_module,
                   triton_module: str):
    """(backend name, module with update_) of optimizer op `op` (states of `bits` bits) for one device."""
    name = _backend.choose(op, device.type)
    why = None
    if name == "cuda":
        from . import cuda

        why = cuda.unavailable_reason(bits=bits)
        if why is None and block_size not in CUDA_BLOCK_SIZES:
            why = f"the CUDA step supports block_size in {CUDA_BLOCK_SIZES}, got {block_size}"
    if why is not None:
        if _backend.forced_backend() == "cuda":
            raise _backend.BackendUnavailable(f"dbkernels backend 'cuda' was forced for {op} but {why}")
        name = "triton" if _backend.unavailable_reason("triton", device.type) is None else "reference"
    if name == "reference":
        return name, reference_module
    if name == "triton":
        return name, _backend.import_triton_kernels(triton_module)
    from . import cuda

    return name, cuda if bits == 8 else cuda.FourBit


def _impl(device: torch.device, block_size: int):
    return choose_backend("adamw8bit", device, block_size, bits=8, reference_module=reference,
                          triton_module="dbkernels.optim.triton_kernels")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with 8-bit blockwise-quantized moments.

    m (first moment) uses a signed, v (second moment) an unsigned dynamic 8-bit map with
    one fp32 absmax per `block_size` elements: 2 + 8 / block_size bytes of state per
    parameter (2.03 at 256). Parameters with fewer than `min_8bit_size` elements keep
    fp32 moments (8 bytes each). Parameters may be float32, bfloat16 or float16; the
    update runs in fp32 and bf16 parameters are written back with stochastic rounding
    (`stochastic_rounding=True`, unbiased), so pure-bf16 training needs no fp32 master
    weights. Deterministic: the rounding bits come from a hash of (parameter seed, step,
    element index).

    The algorithm is defined by dbkernels/optim/reference.py; on CUDA tensors a single
    kernel launch updates all parameters of one dtype in a param group.
    """

    _CPU_MULTI_TENSOR = True  # the reference case on CPU tensors: multi_tensor.py (8-bit states only)
    _MIN_SIZE = "min_8bit_size"  # the group key: tensors under it keep fp32 states

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 256, min_8bit_size: int = 4096,
                 stochastic_rounding: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size, stochastic_rounding=stochastic_rounding)
        self._start(params, defaults)

    def _start(self, params, defaults: dict) -> None:
        """The optimizer over `params` with these group defaults (checked first)."""
        self._check_hyper(defaults)
        self._sib_handle = None
        self._cuda_cache: dict = {}
        self._cpu_cache: dict = {}
        torch.optim.Optimizer.__init__(self, params, defaults)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_hyper(g: dict) -> None:
        lr = g["lr"]
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float (tensor lr is not supported by AdamW8bit)")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not g["eps"] >= 0.0:
            raise ValueError(f"eps must be >= 0, got {g['eps']}")
        b = g["betas"]
        if len(b) != 2 or not (0.0 <= b[0] < 1.0 and 0.0 <= b[1] < 1.0):
            raise ValueError(f"betas must be two numbers in [0, 1), got {b}")
        if not g["weight_decay"] >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {g['weight_decay']}")
        bs = g["block_size"]
        if (isinstance(bs, bool) or not isinstance(bs, int) or bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE
                or bs & (bs - 1)):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], "
                             f"got {bs!r}")
        ms = g["min_8bit_size"]
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {ms!r}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_hyper(group)
        for p in group["params"]:
            _check_param(p, "AdamW8bit")
        self._cuda_cache.clear()
        self._cpu_cache.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_sib_handle", None)
        self.__dict__.setdefault("_cuda_cache", {})
        self.__dict__.setdefault("_cpu_cache", {})

    @staticmethod
    def _backend(device: torch.device, block_size: int):
        return _impl(device, block_size)

    # ------------------------------------------------------------------ state
    def _index_of(self) -> dict:
        out, k = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                out[p] = k
                k += 1
        return out

    def _init_state(self, p, group, index: int) -> dict:
        state = self.state[p]
        if state:
            return state
        n = p.numel()
        state["step"] = 0
        state["seed"] = _param_seed(index)
        if n >= group[self._MIN_SIZE] and n > 0:
            nb, nbytes = quant.num_blocks(n, group["block_size"]), self._codes_numel(n)
            state["state1"] = torch.zeros(nbytes, dtype=torch.uint8, device=p.device)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["state2"] = torch.zeros(nbytes, dtype=torch.uint8, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
        self._cuda_cache.clear()
        self._cpu_cache.clear()
        return state

    @staticmethod
    def _codes_numel(n: int) -> int:
        """Bytes of one moment's codes for n elements (one per element at 8 bits)."""
        return n

    @staticmethod
    def _check_saved_by(saved_groups) -> None:
        """A state_dict of another optimizer is refused in one line (its states would be misread)."""
        if any(g.get("state_bits") == 4 for g in saved_groups):
            raise ValueError("this optimizer state was saved by AdamW4bit (4-bit states); load it into "
                             "dbkernels.optim.AdamW4bit, not AdamW8bit")
        if any("amsgrad" in g for g in saved_groups):
            raise ValueError("this optimizer state was saved by torch.optim.AdamW (fp32 states of another "
                             "layout); AdamW8bit cannot continue it: start the optimizer afresh")

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors (codes, absmax, fp32 moments)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

    @staticmethod
    def _grad_of(p):
        g = p.grad
        if g is None:
            return None
        if g.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients (got a sparse grad for a "
                               f"parameter of shape {tuple(p.shape)}); use torch.optim.SparseAdam")
        if g.is_complex():
            raise TypeError(f"AdamW8bit got a complex gradient ({g.dtype}); complex parameters are not supported")
        if g.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"gradient is on {g.device} but the parameter is on {p.device}")
        return g

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        if self._sib_handle is not None:
            raise RuntimeError("AdamW8bit.step() was called while step_in_backward is active: the updates "
                               "already run inside backward(). Call handle.remove() to go back to "
                               "ordinary steps.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = None
        for gi, group in enumerate(self.param_groups):
            buckets = defaultdict(list)
            for p in group["params"]:
                g = self._grad_of(p)
                if g is None:
                    continue
                _check_param(p, "AdamW8bit.step")
                if not self.state[p]:
                    index = index if index is not None else self._index_of()
                    self._init_state(p, group, index[p])
                state = self.state[p]
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append((p, g, state))
            seen = defaultdict(int)
            for (device, dtype, step), items in buckets.items():
                name, impl = self._backend(device, group["block_size"])
                if name == "cuda":
                    # cache key without the step (it changes every call); several step
                    # values in one group (rare: parameters added mid-run) get one table each
                    k = seen[(device, dtype)]
                    seen[(device, dtype)] += 1
                    impl.multi_tensor_step(self._cuda_cache, (gi, device, dtype, k), items, group, step)
                elif name == "reference" and device.type == "cpu" and self._CPU_MULTI_TENSOR:
                    k = seen[(device, dtype)]
                    seen[(device, dtype)] += 1
                    multi_tensor.step_(self._cpu_cache, (gi, dtype, k), items, group, step)
                else:
                    for p, g, state in items:
                        _update_one(impl, p, g, state, group, step)
        return loss

    @torch.no_grad()
    def _step_param(self, p, group) -> None:
        """Update one parameter now (step_in_backward); frees nothing itself."""
        g = self._grad_of(p)
        if g is None:
            return
        _check_param(p, "AdamW8bit")
        if not self.state[p]:
            self._init_state(p, group, self._index_of()[p])
        state = self.state[p]
        state["step"] += 1
        name, impl = self._backend(p.device, group["block_size"])
        _update_one(impl, p, g, state, group, state["step"])

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict() (from any device): tensors move to each parameter's device,
        dtypes are kept (uint8 codes, fp32 absmax / moments), nothing is cast."""
        groups = self.param_groups
        saved = state_dict["param_groups"]
        self._check_saved_by(saved)
        if len(groups) != len(saved):
            raise ValueError(f"loaded state dict has {len(saved)} parameter groups, the optimizer has {len(groups)}")
        for i, (g, s) in enumerate(zip(groups, saved)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(f"parameter group {i}: loaded state dict has {len(s['params'])} parameters, "
                                 f"the optimizer has {len(g['params'])}")
        id_map = {old: p for g, s in zip(groups, saved) for old, p in zip(s["params"], g["params"])}
        new_state = defaultdict(dict)
        for k, st in state_dict["state"].items():
            if k not in id_map:
                continue
            p = id_map[k]
            out = {}
            for key, val in st.items():
                if isinstance(val, torch.Tensor):
                    val = val.detach().to(p.device, copy=True).contiguous()
                out[key] = int(val) if key in ("step", "seed") else val
            n = p.numel()
            codes = out.get("state1", out.get("exp_avg"))
            want = self._codes_numel(n) if "state1" in out else n
            if codes is None or codes.numel() != want:
                raise ValueError(f"loaded state of parameter {k} does not fit a parameter of shape {tuple(p.shape)}")
            new_state[p] = out
        new_groups = []
        for g, s in zip(groups, saved):
            ng = {k: v for k, v in s.items() if k != "params"}
            ng["params"] = g["params"]
            ng["betas"] = tuple(ng["betas"])
            self._check_hyper(ng)
            new_groups.append(ng)
        for p, st in new_state.items():
            group = next(ng for ng in new_groups if any(q is p for q in ng["params"]))
            if "state1" in st and st["absmax1"].numel() != quant.num_blocks(p.numel(), group["block_size"]):
                raise ValueError("loaded 8-bit state was saved with another block_size than the parameter group's")
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._cuda_cache.clear()
        self._cpu_cache.clear()


def _update_one(impl, p, g, state, group, step: int) -> None:
    """One parameter with a per-tensor backend (reference / triton / cuda single-tensor op)."""
    pc = p if p.is_contiguous() else p.contiguous()
    gc = g.contiguous()
    if gc.dtype != p.dtype and not getattr(impl, "IS_REFERENCE", False):
        gc = gc.to(p.dtype)
    impl.update_(pc, gc, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                 weight_decay=group["weight_decay"], step=step, block_size=group["block_size"],
                 stochastic_rounding=group["stochastic_rounding"])
    if pc is not p:
        p.copy_(pc)
