"""Several processes: torchrun data parallel (trainer.distributed.data_parallel) and --shard, the optimizer
state and gradients split over the ranks (trainer.distributed.shard, ZeRO stage 2).

Owns: joining the process group, each rank's rows of the global batch, the collectives of a step
(gradient all-reduce, loss and stop flags), rank-0-only writes (on_rank0), and the estimate's
simulated ranks. May import: trainer.errors, trainer.options, trainer.formats.
"""
