"""The training loop, top to bottom: `dbtrain train`, `dbtrain textual-inversion` and the demo all run `train`.

What differs between full DreamBooth, LoRA, Textual Inversion and pivotal tuning is the run's Method
(trainer.methods: what trains and what is saved); what differs between SD 1.x/2.x and SDXL is its
Family (trainer.families). Under torchrun every rank runs this; only rank 0 writes (on_rank0).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from trainer.core import checkpoint, concepts, ema, guard, inputs, interrupts, prompts, runlog, validation
from trainer.core.batches import Batches
from trainer.core.step import setup, train_step
from trainer.distributed import data_parallel as distributed
from trainer.errors import Resumable, UserError
from trainer.families import family_of
from trainer.formats import outdir
from trainer.methods import method_for
from trainer.methods.base import HALF

# fp16 autocast against fp32 training steps on this repository's 2-core CPU, built-in model at 64 px
# (docs, "Training"): CPUs have no fast fp16 matmuls, bf16 has them.
# Median over 3-5 interleaved rounds of 10 steps: 2.0x, 2.2x and 2.6x; bf16 0.8-0.9x of fp32's time.
FP16_CPU_NOTE = ("note: --mixed_precision fp16 on a CPU runs about {x} slower than fp32 (measured on a 2-core "
                 "CPU: CPUs have no fast fp16 math); use --mixed_precision bf16 or no")
FP16_CPU_FACTOR = "2-3x"


def train(opts, *, preflight=None, log_estimate=None) -> Path:
    """Run training as configured (a checked trainer.options.train.TrainOptions); returns the output folder.

    On a GPU, preflight(opts, device) may return a warning line (the step's estimated peak against the free
    memory) and log_estimate(opts) the estimate's fields for the log lines (trainer.memory gives both)."""
    progress = {"step": 0}
    try:
        return _train(opts, progress, preflight, log_estimate)
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(runlog.oom_advice(opts)) from e
    except Exception as e:  # torchrun: a collective failed because another rank died or hung -> one line
        msg = distributed.stopped_message(e, progress["step"])
        if msg is None:
            raise
        raise Resumable(msg) from e
    finally:
        distributed.shutdown()
        outdir.release(opts.checkpoints.output_dir)  # (a folder made for a run that wrote nothing is removed)


def _train(opts, progress: dict, preflight, log_estimate) -> Path:
    data, prior, training = opts.data, opts.prior, opts.training
    # torchrun (WORLD_SIZE > 1): join the process group; only rank 0 writes (distributed.on_rank0)
    device = distributed.init(opts) or torch.device(opts.distributed.device or
                                                    ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.memory.allow_tf32:  # diffusers' --allow_tf32: TF32 matmuls/convolutions (Ampere+)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(opts.checkpoints.output_dir)
    inputs.check_paths(opts)  # (the CLI ran these before importing torch; callers of train() may not have)
    ema.check(opts, device)
    if device.type == "cpu" and opts.memory.mixed_precision == "fp16":
        print(FP16_CPU_NOTE.format(x=FP16_CPU_FACTOR), file=sys.stderr, flush=True)
    resume = distributed.on_rank0(checkpoint.prepare_output_dir, opts)
    distributed.on_rank0(outdir.check_space, opts)
    if preflight is not None and device.type == "cuda" and distributed.is_main():  # torchrun: rank 0 for all
        warning = preflight(opts, device)
        if warning:
            print(warning, file=sys.stderr, flush=True)

    # --- the subject's images (bad images fail before the model loads), the model, what trains ---
    subjects = concepts.Subjects(opts)  # --concepts FILE: each concept's; else the flags' one subject
    torch.manual_seed(training.seed)
    model = opts.model
    family = family_of(model.pretrained_model_name_or_path)
    comps = family.load_components(model.pretrained_model_name_or_path, variant=model.variant,
                                   vae=model.pretrained_vae_model_name_or_path, tokenizer=model.tokenizer_name)
    prompts.note_class_labels(opts, comps.unet)
    method = method_for(opts)

    # --- prompts, with [V] replaced by the identifier (or the new tokens it became); each concept its own ---
    word, ident, run_prompts = subjects.prompts(method, comps)

    # --- class images (each concept's, generated first where missing), then the batches ---
    half = HALF.get(opts.memory.mixed_precision) if device.type == "cuda" else None
    cls = cls_prompts = cls_concepts = None
    if prior.with_prior_preservation:
        cls, cls_prompts, cls_concepts = subjects.class_images(device, half or torch.float32)
    batches = Batches(opts, family, comps, subjects.inst, cls, run_prompts.by_kind, device, half or torch.float32,
                      inst_prompts=run_prompts.instance, templates=data.prompt_templates, word=word,
                      cls_prompts=cls_prompts, **subjects.draws(cls_concepts))
    distributed.on_rank0(outdir.claim, out, opts.to_dict())  # only once the inputs are known to be good

    # --- the trainable state, resumed from a checkpoint if there is one ---
    run = setup(opts, method, comps, batches, device)
    run.identifier = ident
    run.ema = ema.make(opts, run.params, device)  # --use_ema: the average of the trained tensors
    start = checkpoint.resume_run(run, resume) if resume is not None else 0
    if run.ema is not None and distributed.is_main():
        print(run.ema.describe(), flush=True)
    run.guard = guard.Guard(run.params, checkpoint.load_state(resume).get("guard") if resume is not None else None,
                            zero_loss=1.0 + (prior.prior_loss_weight if prior.with_prior_preservation else 0.0))
    log = runlog.RunLog(out, opts, files=distributed.is_main())
    if log_estimate is not None and device.type == "cuda" and distributed.is_main():  # beside the measured peak
        try:
            log.estimate = log_estimate(opts)
        except Exception:  # noqa: BLE001 - advisory only, as the preflight
            log.estimate = {}
    skipped, done = 0, start

    from tqdm.auto import tqdm

    total = training.max_train_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step",
               disable=not distributed.is_main())
    with interrupts.StopRequests() as stop:
        try:
            for step in bar:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                res = train_step(run, step)
                if run.ema is not None and res.stepped and res.finite_state:  # (a skipped step: left as it was)
                    run.ema.update()
                if step == start:
                    _note_first_step_compile(bar)
                if not res.stepped:
                    skipped += 1
                done = progress["step"] = step + 1
                if done % training.log_every == 0 or done == total:
                    terms = distributed.mean_terms(runlog.loss_terms(run, res))  # torchrun: over all ranks
                    rec = log.write(done, res.loss, terms, run.lr_scheduler.get_last_lr()[0],
                                    (time.perf_counter() - t0) * 1000, device, skipped)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", skipped=skipped)
                    bar.write(runlog.log_line(rec))
                why = run.guard.check(done, res.loss, res.stepped, res.finite_state)
                if why is not None:  # before anything of this step is saved
                    raise UserError(distributed.on_rank0(_diverged, run, out, done, why) or f"diverged at step {done}")
                saved = None
                averaged = run.ema is not None and method.writes_at(opts, done)  # --use_ema: its files hold the average
                with ema.averaged(run) if averaged else contextlib.nullcontext():
                    method.on_step(run, out, done)  # (its files: rank 0 only)
                if done % opts.checkpoints.checkpointing_steps == 0 and done < total:
                    saved = _checkpoint(run, out, done)
                elif done == total:  # the final state too, so that a finished run can be trained more
                    saved = _final_checkpoint(run, out, done)
                if opts.logging.validation_prompt and done % opts.logging.validation_steps == 0:
                    distributed.on_rank0(_validate, run, run_prompts.sub(opts.logging.validation_prompt),
                                         out / "validation", f"step-{done:06d}")
                # torchrun: a stop request that reached some ranks stops all of them at this step
                if distributed.any_flag(stop.signum is not None) and done < total:
                    signum = stop.signum or interrupts.signal.SIGTERM
                    saved = saved or _checkpoint(run, out, done)
                    raise Resumable(f"{interrupts.signal_name(signum)} at step {done} of {total}; saved "
                                    f"{saved}{distributed.resume_note()}", kind="interrupted", exit_code=128 + signum)
            if skipped > total // 2:
                raise UserError(f"{skipped} of {total} steps had a non-finite loss or gradient and were skipped; "
                                f"lower --learning_rate or use --mixed_precision bf16")
        finally:
            bar.close()
            log.close()
            if run.hook is not None:
                run.hook.remove()
            if run.shard is not None:
                run.shard.remove()
        with _whole_state(run):  # --shard: a failed export saves a checkpoint, with the whole state
            distributed.on_rank0(save_model, run, out, done)
    distributed.on_rank0(runlog.record_subject, out, opts, run, ident, run_prompts)
    if run.ema is not None and opts.ema.save_raw_weights:  # raw/ is a result of its own (sample --model OUT/raw)
        raw = out / ema.RAW
        distributed.on_rank0(runlog.record_subject, raw, ema.raw_options(opts, raw), run, ident, run_prompts)
    distributed.on_rank0(outdir.write_marker, out, finished=True, final_step=done)
    print(f"saved {method.saved} to {out} ({skipped} skipped step(s))")
    return out


def _note_first_step_compile(bar) -> None:
    """Say once how much of the first step was Triton compiling and autotuning (a one-time cost, cached)."""
    from dbkernels import _triton

    stats = _triton.first_call_stats()
    if stats["launches_compiled"]:
        bar.write(f"first step: {stats['compile_tune_s']:.1f} s compiling/autotuning {stats['launches_compiled']} "
                  f"Triton kernel launch(es); cached for later steps and runs")


def _diverged(run, out: Path, step: int, why: str) -> str:
    """The one line of a run that diverged at `step`; checkpoints since it looked suspect are set aside."""
    moved = guard.set_aside(out, run.guard.suspect_since, checkpoint.list_checkpoints)
    last = checkpoint.newest_intact(out)
    where = (f"the last good checkpoint is {last}: resume from it (--resume_from_checkpoint latest) with a lower "
             f"--learning_rate" if last else "no good checkpoint was written: start again with a lower --learning_rate")
    aside = f"; set aside as not resumable: {', '.join(moved)}" if moved else ""
    return f"training diverged at step {step}: {why}; {where}{aside}"


def _validate(run, prompt: str, folder: Path, name: str) -> Path:
    """A validation grid of the model as it is exported: with --use_ema the average (diffusers does the same)."""
    with ema.averaged(run):
        return validation.validate(run, prompt, folder, name)


def _whole_state(run):
    """--shard: rank 0 holds every rank's optimizer state within (a collective: all ranks enter it)."""
    return run.shard.gathered() if run.shard is not None else contextlib.nullcontext()


def _checkpoint(run, out: Path, step: int) -> Path:
    with _whole_state(run):
        return distributed.on_rank0(save_checkpoint, run, out, step)


def _save_state(run, out: Path, step: int, total_limit) -> Path:
    items = {**run.models, **({ema.FOLDER: run.ema} if run.ema is not None else {})}  # (the trained state, the average)
    return checkpoint.save(out, step, models=items, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                           scaler=run.scaler, config=run.opts.to_dict(), total_limit=total_limit,
                           extra=_extra_state(run))


def _extra_state(run) -> dict:
    """What a checkpoint keeps beside the weights: the divergence guard's state; --concepts: the concepts as
    they were read, so that a resume notices an edited file (the file's path alone would not)."""
    extra = {"guard": run.guard.state_dict()} if run.guard is not None else {}
    if run.opts.data.concepts:
        extra["concepts"] = checkpoint.concepts_record(run.opts)
    return extra


def _final_checkpoint(run, out: Path, step: int) -> Path | None:
    """checkpoint-<last step>; on a full disk only a note: the model itself still gets written."""
    try:
        with _whole_state(run):
            return distributed.on_rank0(_save_state, run, out, step, run.opts.checkpoints.checkpoints_total_limit)
    except UserError as e:  # (NoSpace; under torchrun every rank gets rank 0's error as a UserError)
        print(f"dbtrain: warning: the final state was not kept ({e}); training this run more will continue from "
              f"its newest checkpoint", file=sys.stderr, flush=True)
        return None


def save_checkpoint(run, out: Path, step: int) -> Path:
    """checkpoint-<step>; on a full disk a one-line error naming the last good checkpoint."""
    try:
        return _save_state(run, out, step, run.opts.checkpoints.checkpoints_total_limit)
    except outdir.NoSpace as e:
        last = checkpoint.newest_intact(out)
        kept = f"kept the last good checkpoint {last}" if last else "no checkpoint saved yet"
        raise Resumable(f"{e}; {kept}; free some space, then resume") from e


def save_model(run, out: Path, step: int) -> None:
    """The method's final files (with --use_ema: of the average, and with --save_raw_weights those of the trained
    tensors in out/raw); if writing them fails, the trained state goes into checkpoint-<step> so nothing is lost."""
    try:
        with ema.averaged(run):
            run.method.save(run, out, step)
        if run.ema is not None and run.opts.ema.save_raw_weights:
            run.method.save(run, ema.raw_folder(out), step)
    except UserError as e:
        where = out / f"checkpoint-{step}"
        if checkpoint.verify(where) is not None:
            try:
                _save_state(run, out, step, None)
            except outdir.NoSpace:
                where = checkpoint.newest_intact(out)
        kept = (f"the trained state is saved in {where}" if where is not None and where.name.endswith(f"-{step}")
                else f"the last good checkpoint is {where}" if where is not None else "no checkpoint could be saved")
        raise Resumable(f"{e}; {kept}; fix that, then resume to write the model") from e
