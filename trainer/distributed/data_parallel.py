"""Data parallel training on torch.distributed (issue 20): `torchrun --nproc_per_node N -m trainer train ...`.

One global batch is N x --train_batch_size rows. Every rank draws the whole global batch's random choices
(images, flips, VAE samples, noise, timesteps: all seeded by (seed, step, micro-step) in trainer.core) and
keeps only its own rows r*b .. (r+1)*b-1 of the instance rows and of the class rows, so the union of the
ranks' rows is exactly the batch one process at batch N*b trains on. After backward the gradients are
averaged with all-reduce (in buckets, once per optimizer step); every rank then takes the same optimizer
step, so the weights and the (replicated) optimizer state stay identical everywhere. DDP's reducer is not
used: it fixes the trained parameters when it wraps a module, and pivotal tuning switches its new token rows
off mid-run, and the text encoders are called outside the UNet. With --step_in_backward each gradient is
averaged in its own post-accumulate hook, just before its update (average_in_backward).

Only rank 0 writes (output folder checks, logs, checkpoints, validation grids, the export); `on_rank0` runs
such a part there and hands its result, or its error, to the other ranks. NCCL on GPUs, gloo on CPUs; every
collective has --ddp_timeout seconds, so a rank that dies or hangs ends the others with a one-line error.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch

from trainer.errors import Resumable, UserError


class _NoComm:
    """The collectives of a simulated rank (trainer.memory: one rank's memory, no other processes)."""

    def all_reduce(self, *a, **k):
        return None

    reduce = broadcast = all_reduce


def comm():
    """torch.distributed, or nothing-doing collectives in the estimate's simulated ranks."""
    if _STATE.get("simulated"):
        return _NoComm()
    import torch.distributed as dist

    return dist


@contextlib.contextmanager
def simulated(n: int, shard: bool = False):
    """Within: this process is one of n ranks for the step's code (its rows of the global batch; with shard the
    rank holding the most optimizer state, picked by trainer.distributed.shard), with no collectives
    (trainer.memory)."""
    saved = dict(_STATE)
    if n > 1:
        _STATE.update(rank=None if shard else 0, world=n, simulated=True)
    try:
        yield
    finally:
        _STATE.clear()
        _STATE.update(saved)


def set_simulated_rank(r: int) -> int:
    _STATE["rank"] = r
    return r

_STATE = {"rank": 0, "world": 1, "timeout": None}
BUCKET_ELEMS = 1 << 24  # gradient elements per all-reduce (64 MB in fp32): few collectives, bounded extra memory


def env_world() -> int:
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() else 1


def rank() -> int:
    return _STATE["rank"]


def world() -> int:
    return _STATE["world"]


def is_main() -> bool:
    return _STATE["rank"] == 0


def init(opts) -> torch.device | None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns this rank's device
    (None: one process, the caller picks the device as before)."""
    n = env_world()
    if n <= 1:
        return None
    import torch.distributed as dist

    rk, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = opts.distributed.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise UserError(f"rank {rk}: LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} "
                            f"GPU(s); start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = int(opts.distributed.ddp_timeout)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                            **({"device_id": device} if backend == "nccl" else {}))
    _STATE.update(rank=dist.get_rank(), world=dist.get_world_size(), timeout=timeout)
    if rk != 0:  # one copy of the progress output: rank 0's (errors still reach stderr from every rank)
        _STATE["stdout"] = sys.stdout
        sys.stdout = open(os.devnull, "w")
    print(f"data parallel: {n} ranks ({backend}), global batch {n} x {opts.training.train_batch_size}", flush=True)
    return device


def shutdown() -> None:
    if _STATE["world"] <= 1:
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    if "stdout" in _STATE:
        sys.stdout.close()
        sys.stdout = _STATE.pop("stdout")
    _STATE.update(rank=0, world=1, timeout=None)


def stopped_message(err: BaseException, step: int) -> str | None:
    """The one line for a collective that failed because another rank died or hung (None: not that)."""
    if _STATE["world"] <= 1:
        return None
    import torch.distributed as dist

    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    comm = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")
    if not isinstance(err, dist.DistError) and not (isinstance(err, RuntimeError)
                                                     and any(w in text.lower() for w in comm)):
        return None
    return (f"rank {rank()} of {world()}: another rank stopped or did not answer within --ddp_timeout "
            f"{_STATE['timeout']} s after step {step} ({type(err).__name__}: {text}); the run ended there"
            + resume_note())


def resume_note() -> str:
    """Said where a run under torchrun stops resumably: the line to continue it is the torchrun line."""
    if _STATE["world"] <= 1:
        return ""
    return (f" (started by torchrun: continue with the same torchrun --nproc_per_node {_STATE['world']} line plus "
            f"--resume_from_checkpoint latest)")


def on_rank0(fn, *args, **kwargs):
    """fn(*args) on rank 0 only (a write); every rank returns its result, or raises its error (UserError and
    Resumable keep their message, so every rank ends the same way)."""
    if _STATE["world"] <= 1:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    box = [None]
    err = None
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Resumable as e:
            err, box[0] = e, ("resumable", str(e), e.kind, e.exit_code)
        except UserError as e:
            err, box[0] = e, ("user", str(e))
        except BaseException as e:  # noqa: BLE001 - handed on as a one-line error, re-raised here as it was
            err, box[0] = e, ("other", f"rank 0 failed: {type(e).__name__}: {str(e)[:200]}")
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    kind, *rest = box[0]
    if kind == "ok":
        return rest[0]
    if kind == "resumable":
        raise Resumable(rest[0], kind=rest[1], exit_code=rest[2])
    if kind == "user":
        raise UserError(rest[0])
    raise RuntimeError(rest[0])


def barrier() -> None:
    if _STATE["world"] > 1:
        import torch.distributed as dist

        dist.barrier()


def my_rows(b: int, groups: int, device) -> torch.Tensor | None:
    """This rank's rows of the global batch [instance N*b; class N*b] (None: one process, all rows)."""
    n = _STATE["world"]
    if n <= 1:
        return None
    r = _STATE["rank"]
    return torch.tensor([g * n * b + r * b + k for g in range(groups) for k in range(b)], device=device)


def any_flag(flag: bool) -> bool:
    """True when any rank says so (a stop request that reached only some ranks stops all at the same step)."""
    if _STATE["world"] <= 1 or _STATE.get("simulated"):
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def mean_terms(terms: tuple) -> tuple:
    """(instance loss, prior loss) of the log averaged over ranks (prior None on every rank or on none)."""
    if _STATE["world"] <= 1:
        return terms
    import torch.distributed as dist

    inst, prior = terms
    t = torch.tensor([inst, prior if prior is not None else 0.0], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    t /= _STATE["world"]
    return float(t[0]), (float(t[1]) if prior is not None else None)


def reduce_step(params: list, loss: float, finite: bool) -> tuple[float, bool]:
    """After a step's backward passes: the global mean loss, whether every rank's loss was finite, and (when
    it was) every gradient replaced by its mean over the ranks."""
    n = _STATE["world"]
    loss, finite = reduce_loss(loss, finite)
    if not finite:
        return loss, False
    dist = comm()
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters have gradients on every rank
    for bucket in buckets(grads):
        on_flat(bucket, lambda flat: (dist.all_reduce(flat), flat.div_(n)))
    return loss, True


def reduce_loss(loss: float, finite: bool) -> tuple[float, bool]:
    """The global mean loss and whether every rank's was finite (--shard: the gradients went in the hooks)."""
    if _STATE.get("simulated"):
        return loss, finite
    import torch.distributed as dist

    t = torch.tensor([loss if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    if t[1].item() > 0:
        return float("nan"), False
    return float(t[0].item()) / _STATE["world"], True


def average_in_backward(params: list) -> None:
    """--step_in_backward under torchrun: each gradient is averaged over the ranks as soon as it is complete
    (a post-accumulate-grad hook registered before step_in_backward's, so it runs first); every rank runs the
    same graph, so the hooks and their all-reduces come in the same order everywhere."""
    if _STATE["world"] <= 1:
        return
    dist = comm()
    n = _STATE["world"]

    def average(p):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)

    for p in params:
        p.register_post_accumulate_grad_hook(average)


def buckets(tensors: list):
    """Runs of consecutive tensors of one dtype and device, at most BUCKET_ELEMS elements each (unless one tensor
    is larger): one collective per run, with bounded extra memory."""
    bucket: list = []
    size = 0
    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + t.numel() > BUCKET_ELEMS):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def on_flat(tensors: list, op, copy_back: bool = True) -> None:
    """op(flat) on the tensors as one flat tensor (the tensor itself when there is one, in place), then the
    result written back into them unless copy_back is False."""
    if len(tensors) == 1:
        op(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    op(flat)
    if copy_back:
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def comm_device():
    if _STATE.get("simulated"):
        return "cpu"
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def share(indices: list[int]) -> list[int]:
    """This rank's part of a list of work items (class images to generate): every N-th, starting at its rank."""
    return indices[_STATE["rank"]::_STATE["world"]]


def sum_int(k: int) -> int:
    if _STATE["world"] <= 1:
        return k
    import torch.distributed as dist

    t = torch.tensor([k], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return int(t.item())
