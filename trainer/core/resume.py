"""Resuming with other flags: what may change mid-run is applied (with a note), the rest is refused.

A checkpoint records the options of the run that wrote it. On resume every option that differs is
either one a run can take from the resumed step on (how long it runs and its learning-rate schedule,
its batch, checkpointing, logging, validation, and what only changes memory or speed) or one that would make
the checkpoint's weights and optimizer state mean something else (model, data, prompts, method,
resolution, optimizer and its precision...): those are refused in one line before a model loads.
"""
from __future__ import annotations

import os

from trainer.errors import UserError

# applied from the resumed step on: the learning-rate schedule is rebuilt from them at that step
RESCHEDULE = ("max_train_steps", "num_train_epochs", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
              "lr_num_cycles", "lr_power", "text_embedding_lr")
MAY_CHANGE = frozenset(RESCHEDULE + (
    # what is written and when
    "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "save_steps", "save_single_file",
    "single_file_half", "skip_save_text_encoder", "save_as_full_pipeline", "no_safe_serialization",
    "save_raw_weights",
    # logging and validation
    "logging_dir", "report_to", "log_every", "validation_prompt", "validation_steps", "num_validation_images",
    "validation_scheduler", "validation_epochs", "validation_images", "push_to_hub", "hub_token", "hub_model_id",
    # memory, speed and placement only (the same arithmetic, the same state)
    "gradient_checkpointing", "allow_tf32", "enable_xformers_memory_efficient_attention", "set_grads_to_none",
    "ema_device",
    "pre_compute_text_embeddings", "dataloader_num_workers", "kernels", "step_in_backward", "device",
    "ddp_timeout", "local_rank", "shard", "max_grad_norm", "card_gb", "estimate_only", "config",
    # the batch (torchrun: a run resumes on another number of ranks with the same global batch), and a
    # run folder copied or moved elsewhere
    "train_batch_size", "gradient_accumulation_steps", "output_dir",
    # only for class images still to be generated
    "sample_batch_size", "prior_generation_precision", "class_inference_steps", "prompt_without_identifier",
))
SECRET = frozenset({"hub_token"})  # named, never shown
PATHS = frozenset({"pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "tokenizer_name",
                   "pretrained_vae_model_name_or_path", "output_dir", "concepts", "mask_dir"})


def _same(key: str, now, then) -> bool:
    if now == then:
        return True
    if key in PATHS and isinstance(now, str) and isinstance(then, str):
        return os.path.realpath(now) == os.path.realpath(then)
    if isinstance(now, (int, float)) and isinstance(then, (int, float)) and not isinstance(now, bool):
        return float(now) == float(then)
    if isinstance(now, (list, tuple)) and isinstance(then, (list, tuple)):
        return list(now) == list(then)
    return False


def _shown(key: str, now, then) -> str:
    return f"--{key}" if key in SECRET else f"--{key} {then} -> {now}"


def differences(now: dict, then: dict) -> tuple[dict, dict]:
    """({key: (now, then)} that may change, {key: (now, then)} that may not); keys the record lacks (options
    added since it was written) count as unchanged."""
    may, may_not = {}, {}
    for key, value in now.items():
        if key in then and not _same(key, value, then[key]):
            (may if key in MAY_CHANGE else may_not)[key] = (value, then[key])
    return may, may_not


def _why(key: str, now, then) -> str:
    """What a refused change means, in the user's words where a plain 'differs' would puzzle."""
    if key == "lora_rank" and then is None:
        return "the run there trains the full model, not LoRA adapters"
    if key == "lora_rank" and now is None:
        return f"the run there trains LoRA adapters of rank {then}, not the full model"
    if key == "method":
        return f"the run there is {then}, not {now}"
    if key == "use_ema":
        return "the run there " + ("keeps no" if now else "keeps an") + " average of its weights (--use_ema)"
    if key == "train_text_embedding":
        return "the run there " + ("does not train" if now else "trains") + " new token embeddings (pivotal tuning)"
    return f"the run's {then!r}, now {now!r}" if key not in SECRET else "it differs"


def check(opts, folder, recorded: dict) -> list[str]:
    """Refuse (one line) what may not change since the checkpoint at `folder`; the names of what changes."""
    may, may_not = differences(opts.to_dict(), recorded)
    if may_not:
        parts = "; ".join(f"--{k}: {_why(k, *v)}" for k, v in may_not.items())
        raise UserError(f"cannot resume {folder} with other options ({parts}): a run's model, data, prompts, method, "
                        f"resolution and optimizer are fixed once it starts; pass the run's values, or choose a "
                        f"new --output_dir")
    may.pop("resume_from_checkpoint", None)
    if may:
        print(f"resuming {folder.name} with changed options, applied from its step on: "
              + ", ".join(_shown(k, *v) for k, v in may.items()), flush=True)
    return sorted(may)


def reschedule(run, fresh_initial_lrs: list[float], step: int) -> None:
    """The learning-rate schedule of the run's (new) options at `step`, instead of the checkpoint's.

    The scheduler that setup() built from the new options is a LambdaLR (every diffusers schedule is);
    the checkpoint's optimizer state brought back its old initial learning rates, so those are reset
    to the new ones and the schedule is put at `step`."""
    sched, groups = run.lr_scheduler, run.optimizer.param_groups
    for g, lr in zip(groups, fresh_initial_lrs):
        g["initial_lr"] = lr
    sched.base_lrs = list(fresh_initial_lrs)
    sched.last_epoch = step
    for g, rule, base in zip(groups, sched.lr_lambdas, sched.base_lrs):
        g["lr"] = base * rule(step)
    sched._last_lr = [g["lr"] for g in groups]
