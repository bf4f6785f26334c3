"""--shard under torchrun: the optimizer state and the gradients split over the ranks (ZeRO stage 2).

Every trainable parameter is owned by one rank (whole tensors, the largest first onto the least loaded rank,
so every rank computes the same split). Completed gradients (post-accumulate-grad hooks, on the last
micro-step of a step) are collected in buckets of distributed.BUCKET_ELEMS elements, and each full bucket is
reduced to the owners, one message per owner; the other ranks drop their copies then, so a rank holds about
1/N of the gradients plus one bucket. Only the owner has the parameter's optimizer state and updates it;
then the owner broadcasts the new values, and every rank again holds the whole model (the weights are not
sharded: the forward needs them, and gathering them layer by layer, ZeRO-3 / FSDP, is not built).

The update itself is the unsharded one: the same optimizer over the same parameter list (AdamW8bit's
stochastic-rounding seed is the parameter's index there), the same averaged gradient; the global gradient
norm for --max_grad_norm is summed over the owners; with fp16 the loss scaler agrees on inf/NaN across the
ranks (torch's ShardedGradScaler). With --step_in_backward the owner updates inside the hook and broadcasts
right after it.

Checkpoints hold the whole optimizer state in the unsharded format: the owners send their parameters' states
to rank 0 while it saves (`gathered`), and a resumed run keeps only its own (`own_state`), so a checkpoint
resumes sharded or not, on any number of ranks. Collectives are torch.distributed's reduce, broadcast and
send/recv_object_list (trainer.distributed.comm: none in the estimate's simulated ranks).
"""
from __future__ import annotations

import contextlib

import torch

from trainer.distributed import data_parallel as distributed

STATE_CHUNK = 64 << 20  # optimizer-state bytes per message to rank 0 at a checkpoint: bounded extra memory


def partition(params: list, n: int) -> list[int]:
    """Owner rank of each parameter: largest first onto the rank with the fewest bytes so far (ties: lower
    rank, then earlier parameter), the same on every rank."""
    load = [0] * n
    owner = [0] * len(params)
    order = sorted(range(len(params)), key=lambda i: (-params[i].numel() * params[i].element_size(), i))
    for i in order:
        k = min(range(n), key=lambda r: (load[r], r))
        owner[i] = k
        load[k] += params[i].numel() * params[i].element_size()
    return owner


class Sharding:
    """The split of one run's trainable parameters, with the hooks and steps that use it (see the module doc)."""

    def __init__(self, params: list, optimizer):
        self.params, self.optimizer = list(params), optimizer
        self.n = distributed.world()
        self.owner = partition(self.params, self.n)
        self.rank = distributed.rank()
        if self.rank is None:  # the estimate's simulated rank: the one holding the most state
            load = [sum(p.numel() for p, k in zip(self.params, self.owner) if k == r) for r in range(self.n)]
            self.rank = distributed.set_simulated_rank(max(range(self.n), key=lambda r: (load[r], -r)))
        self.owner_of = {p: k for p, k in zip(self.params, self.owner)}
        self.index = {p: i for i, p in enumerate(self.params)}
        self.reduce_now = True  # False on micro-steps before the last: gradients accumulate locally
        self._hooks: list = []

    def mine(self, p) -> bool:
        return self.owner_of[p] == self.rank

    # ---------------------------------------------------------------- gradients
    def reduce_hooks(self, each: bool = False) -> None:
        """Each completed gradient joins a bucket; a full bucket (BUCKET_ELEMS) goes to the owners, one message
        per owner and dtype, and the rest at flush() after backward. each=True (step_in_backward, whose update
        runs in the next hook): every gradient at once. Registered before step_in_backward's hooks."""

        def reduce(p):
            if not self.reduce_now or p.grad is None:
                return
            self._pending.append(p)
            self._pending_elems += p.numel()
            if each or self._pending_elems >= distributed.BUCKET_ELEMS:
                self.flush()

        self._pending: list = []
        self._pending_elems = 0
        self._hooks += [p.register_post_accumulate_grad_hook(reduce) for p in self.params]

    def flush(self) -> None:
        """Reduce the bucketed gradients to their owners (mean); the other ranks drop theirs. Every rank has
        the same bucket (the same graph completes its gradients in the same order everywhere)."""
        groups: dict = {}
        for p in self._pending:
            groups.setdefault((self.owner_of[p], p.grad.dtype, p.grad.device), []).append(p)
        self._pending, self._pending_elems = [], 0
        comm = distributed.comm()
        for (k, _dtype, _dev), ps in groups.items():
            mine = k == self.rank
            distributed.on_flat([p.grad for p in ps], lambda flat: (comm.reduce(flat, dst=k),
                                                                    flat.div_(self.n) if mine else None),
                                copy_back=mine)
            if not mine:
                for p in ps:
                    p.grad = None  # another rank's: the memory goes back now

    def broadcast_hooks(self) -> None:
        """--step_in_backward: registered after its hooks; the owner's fresh values go to every rank."""
        comm = distributed.comm()

        def share(p):
            if self.reduce_now:
                comm.broadcast(p.data, src=self.owner_of[p])

        self._hooks += [p.register_post_accumulate_grad_hook(share) for p in self.params]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch's clip_grad_norm_ over all ranks' gradients, bit for bit: each owner's per-tensor norms go to
        every rank (a sum with zeros, exact), which combines them in the unsharded order and dtypes."""
        from torch.nn.utils import clip_grads_with_norm_, get_total_norm

        n = len(self.params)
        v = torch.zeros(2 * n, dtype=torch.float32, device=self.params[0].device)
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if have:
            v[have] = torch.stack([get_total_norm([self.params[i].grad]).float() for i in have])
            v[[n + i for i in have]] = 1.0
        v = v.to(distributed.comm_device())
        distributed.comm().all_reduce(v)
        v = v.to(self.params[0].device)
        present = [True] * n if _fake(v) else [x > 0 for x in v[n:].tolist()]
        norms = [v[i].to(p.dtype) for i, p in enumerate(self.params) if present[i]]
        total = get_total_norm(norms) if norms else torch.zeros((), device=self.params[0].device)
        clip_grads_with_norm_([p for p in self.params if p.grad is not None], max_norm, total)
        return total

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def broadcast_params(self) -> None:
        """After the owners' optimizer step: every rank gets the new values (one flat message per owner, dtype
        and bucket of distributed.BUCKET_ELEMS elements)."""
        comm = distributed.comm()
        for k in range(self.n):
            for bucket in distributed.buckets([p.data for p, o in zip(self.params, self.owner) if o == k]):
                distributed.on_flat(bucket, lambda flat: comm.broadcast(flat, src=k), copy_back=k != self.rank)

    # ---------------------------------------------------------------- checkpoints
    def own_state(self, state_dict: dict) -> dict:
        """An optimizer state_dict (unsharded format, e.g. a checkpoint's) with only this rank's parameters."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        keep = {ids[j] for j, p in enumerate(self.params) if j < len(ids) and self.mine(p)}
        return {**state_dict, "state": {i: s for i, s in state_dict["state"].items() if i in keep}}

    @contextlib.contextmanager
    def gathered(self):
        """Every rank: the owners send their parameters' optimizer states to rank 0, which holds them (on the
        CPU) in its optimizer until the block ends, so optimizer.state_dict() there is the whole unsharded one."""
        import torch.distributed as dist

        opt, added = self.optimizer, []
        if self.rank != 0:
            chunks, chunk, size = [], {}, 0
            for p in self.params:
                if self.mine(p) and opt.state.get(p):
                    chunk[self.index[p]] = {k: v.detach().cpu() if torch.is_tensor(v) else v
                                            for k, v in opt.state[p].items()}
                    size += sum(v.numel() * v.element_size() for v in chunk[self.index[p]].values()
                                if torch.is_tensor(v))
                    if size >= STATE_CHUNK:
                        chunks.append(chunk)
                        chunk, size = {}, 0
            if chunk:
                chunks.append(chunk)
            dist.send_object_list([len(chunks)], dst=0)
            for c in chunks:
                dist.send_object_list([c], dst=0)
        else:
            for src in range(1, self.n):
                box = [None]
                dist.recv_object_list(box, src=src)
                for _ in range(box[0]):
                    dist.recv_object_list(box, src=src)
                    for i, st in box[0].items():
                        p = self.params[i]
                        opt.state[p] = st
                        added.append(p)
        try:
            yield
        finally:
            for p in added:
                opt.state.pop(p, None)


def _fake(t) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor)


def scaler(device: torch.device):
    """fp16 under --shard: a GradScaler whose inf/NaN check is agreed by all ranks (each sees only its grads)."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type)
