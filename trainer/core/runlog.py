"""What a training run writes besides its weights: the step log (JSONL and TensorBoard), the
subject record `dreambooth.json` that `dbtrain eval` reads, and the advice printed when the GPU
runs out of memory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from trainer.methods.outputs import SUBJECT_FILE


def oom_advice(opts) -> str:
    memory, training = opts.memory, opts.training
    tips = []
    if not memory.gradient_checkpointing:
        tips.append("--gradient_checkpointing")
    if memory.mixed_precision == "no":
        tips.append("--mixed_precision bf16")
    if opts.optim.optimizer in ("adamw", "bnb8bit"):
        tips.append("--optimizer adamw8bit")
    if opts.optim.optimizer == "adamw8bit":
        tips.append("--optimizer adamw4bit")
    if not memory.step_in_backward and training.gradient_accumulation_steps == 1:
        tips.append("--step_in_backward")
    if memory.weights_dtype == "fp32":
        tips.append("--weights_dtype bf16")
    if training.train_batch_size > 1:
        tips.append("--train_batch_size 1")
    if training.train_text_encoder:
        tips.append("dropping --train_text_encoder")
    tips.append(f"a lower --resolution than {opts.data.resolution}")
    return "out of GPU memory; options that would help: " + ", ".join(tips)


def loss_terms(run, res):
    """(instance loss, prior loss) of a loop.StepResult's last micro-batch, for the log (reference math)."""
    from dbkernels.ops.diffusion_loss import reference as loss_reference

    pred, latents, noise, t, offset = res.last
    with torch.no_grad():
        rows = loss_reference.per_sample_loss(pred, latents, noise, t, run.alphas_cumprod,
                                              prediction_type=run.prediction_type,
                                              snr_gamma=run.opts.training.snr_gamma, noise_offset=offset,
                                              **(res.loss_options or {}))  # (mask, robust loss: as trained)
    n_inst = rows.shape[0] - run.n_prior
    inst = rows[:n_inst].mean().item()
    prior = rows[n_inst:].mean().item() if run.n_prior else None
    return inst, prior


def log_line(rec: dict) -> str:
    prior = f" / prior {rec['loss_prior']:.4f}" if rec["loss_prior"] is not None else ""
    vram = f"  peak {rec['peak_vram_gb']:.2f} GB" if rec["peak_vram_gb"] is not None else ""
    skipped = f"  skipped {rec['skipped_steps']}" if rec["skipped_steps"] else ""
    return (f"step {rec['step']}  loss {rec['loss']:.4f} (instance {rec['loss_instance']:.4f}{prior})  "
            f"lr {rec['lr']:.2e}  {rec['ms_per_step']:.0f} ms/step  {rec['it_per_s']:.2f} it/s{vram}{skipped}")


def logs_folder(out: Path, opts) -> Path:
    """diffusers' --logging_dir: relative to output_dir (default logs); an absolute path as given."""
    return Path(out) / opts.logging.logging_dir


class RunLog:
    """JSONL log (output_dir/logs/train_log.jsonl) and TensorBoard when installed (and --report_to asks for it:
    tensorboard, the default, or all)."""

    def __init__(self, out: Path, opts, files: bool = True):
        self.f = self.tb = None
        self.estimate = {}  # on a GPU: trainer.memory's estimate, logged beside the measured peak
        if not files:  # torchrun: ranks other than 0 make the records (for their log lines) but write nothing
            return
        logs = logs_folder(out, opts)
        logs.mkdir(parents=True, exist_ok=True)
        self.f = open(logs / "train_log.jsonl", "a")
        if str(opts.logging.report_to or "tensorboard") not in ("tensorboard", "all"):
            return  # (the note printed at start says which trackers dbtrain does not have)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(logs))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, step, loss, terms, lr, ms, device, skipped) -> dict:
        rec = {"step": step, "loss": float(loss), "loss_instance": terms[0], "loss_prior": terms[1], "lr": lr,
               "ms_per_step": round(ms, 2), "it_per_s": round(1000.0 / ms, 3) if ms > 0 else None,
               "peak_vram_gb": (round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                if device.type == "cuda" else None),
               "skipped_steps": skipped}
        if device.type == "cuda":
            rec.update(self.estimate)
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        return rec

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()


def record_subject(out: Path, opts, run, identifier: str, prompts) -> None:
    """dreambooth.json: what `dbtrain eval` needs to know of the subject (written atomically), and what the
    run's method says of its result (the embedding file and base model of new tokens, the LoRA file, ...).
    Several concepts (trainer.core.concepts.ConceptPrompts): the first one's as the subject, and under
    "concepts" each one's, with its images' folder, so that eval scores each against its own pictures."""
    instance_prompt = prompts.by_kind["inst"]
    rec = {"identifier": identifier, "class_noun": _class_noun(instance_prompt, prompts.class_word, identifier),
           "instance_prompt": instance_prompt, **run.method.record(opts, run)}
    if getattr(prompts, "concepts", None):
        rec["concepts"] = [_concept_record(c) for c in prompts.concepts]
    tmp = out / f".{SUBJECT_FILE}.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / SUBJECT_FILE)


def _class_noun(instance_prompt: str, class_word: str | None, identifier: str) -> str | None:
    """The class word; without a class prompt, the word after the identifier in the instance prompt."""
    if class_word is not None:
        return class_word
    words = instance_prompt.split()
    return words[words.index(identifier) + 1] if identifier in words[:-1] else None


def _concept_record(c: dict) -> dict:
    concept, p, ident = c["concept"], c["prompts"], c["identifier"]
    inst = p.by_kind["inst"]
    return {"name": concept.name, "identifier": ident, "class_noun": _class_noun(inst, p.class_word, ident),
            "instance_prompt": inst, "class_prompt": concept.class_prompt,
            "instance_data_dir": str(Path(concept.instance_data_dir).resolve()), "repeats": concept.repeats}
