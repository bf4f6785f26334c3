"""The Train page: photos in (shown as the trainer reads them), the options that matter, "Will it fit?"
(`dbtrain estimate`'s verdict for a card size), Start / Stop / Resume of a `dbtrain train` child process, and
the run watched live: progress, the loss curve, validation grids, the console, the run folder and its command
line."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr

from trainer.errors import UserError
from trainer.ui import forms, plot, runs
from trainer.ui.jobs import Busy, Job, child_env, command_line, last_lines

REFRESH_S = 1.0


def _form(values: list) -> forms.TrainForm:
    (model, method, identifier, class_noun, instance_prompt, initializer, steps, lr, resolution, batch, prior,
     n_class, rank, precision, checkpointing, optimizer, masked, val_prompt, val_steps, ckpt_steps, seed, device,
     other) = values
    num = lambda v, kind: kind(v) if v not in (None, "") else None  # noqa: E731
    return forms.TrainForm(model=str(model or "").strip(), method=method, identifier=str(identifier).strip(),
                           class_noun=str(class_noun).strip(), instance_prompt=instance_prompt,
                           initializer_token=initializer or "", max_train_steps=num(steps, int),
                           learning_rate=num(lr, float), resolution=num(resolution, int) or None,
                           train_batch_size=num(batch, int), prior_preservation=bool(prior),
                           num_class_images=num(n_class, int), lora_rank=num(rank, int), mixed_precision=precision,
                           gradient_checkpointing=bool(checkpointing), optimizer=optimizer, masked_loss=bool(masked),
                           validation_prompt=val_prompt or "", validation_steps=num(val_steps, int),
                           checkpointing_steps=num(ckpt_steps, int), seed=num(seed, int), device=device,
                           other_flags=other or "")


def show_photos(photos, masks, masked):
    """The gallery of the dropped photos as the trainer will read them, or the one-line message."""
    from trainer.ui.photos import match_masks, preview

    files = [Path(p) for p in runs.upload_paths(photos)]
    if not files:
        return [], ""
    try:
        found = match_masks(files, [Path(m) for m in runs.upload_paths(masks)])
        shown = preview(files, found, bool(masked))
    except UserError as e:
        return [], f"dbtrain: error: {e}"
    return shown, forms.check_photos(len(files)) or f"{len(files)} photos, as the trainer will read them"


# what the estimate does not read (the data, the output, the validation prompt): left out of its command line
_NOT_ESTIMATED = {"--instance_data_dir", "--instance_prompt", "--class_prompt", "--class_data_dir", "--output_dir",
                  "--validation_prompt", "--mask_dir"}


def _model_flags(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _NOT_ESTIMATED:
            skip = True
        else:
            out.append(a)
    return out


def will_it_fit(card_gb, *values):
    """`dbtrain estimate` with this form's flags and --card_gb: its verdict line, then its whole report."""
    try:
        form = _form(list(values))
        argv = forms.train_argv(form, Path("RUN"))
    except (UserError, TypeError, ValueError) as e:
        return f"dbtrain: error: {e}", ""
    if argv[0] == "textual-inversion":
        return ("Textual Inversion is not estimated (`dbtrain estimate` covers `dbtrain train`'s methods); it trains "
                "only the new token's rows and needs less memory than DreamBooth with the same settings"), ""
    problem = forms.check_argv(argv)  # (the run's flags, as Start would check them)
    if problem:
        return problem, ""
    argv = ["estimate", *_model_flags(argv[1:]), "--card_gb", f"{float(card_gb):g}"]
    try:
        done = subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True,
                              env=child_env(), timeout=600)
    except subprocess.TimeoutExpired:
        return "dbtrain: error: the estimate took over 10 minutes; run it in a terminal: " + command_line(argv), ""
    report = (done.stdout + done.stderr).strip()
    if done.returncode:
        return next((ln for ln in reversed(report.splitlines()) if "error" in ln), report[-300:]), report
    line, advice = forms.verdict(report)
    advice = f"\n\n```\n{advice}\n```" if advice else ""
    return f"**{line or 'estimate done'}**{advice}\n\n`{command_line(argv)}`", report


def start(app, photos, masks, *values):
    """A new run folder with copies of the photos (and masks), then `dbtrain train ...` in it."""
    files = runs.upload_paths(photos)
    problem = forms.check_photos(len(files))
    if problem:
        return problem
    try:
        form = _form(list(values))
        from trainer.ui.photos import match_masks

        match_masks([Path(f) for f in files], [Path(m) for m in runs.upload_paths(masks)])
    except (UserError, TypeError, ValueError) as e:
        return f"dbtrain: error: {e}"
    busy = app.slot.busy()
    if busy:
        return f"dbtrain: error: {busy}; stop it (Stop) or wait for it to end, then start again"
    try:
        folder = runs.new_folder(app.runs_dir, "train")
    except OSError as e:
        return f"dbtrain: error: cannot make a run folder in {app.runs_dir}: {e}"
    try:
        mask_dir = folder / "masks" if masks else None
        argv = forms.train_argv(form, folder, mask_dir=mask_dir)
        runs.copy_in(files, folder / "photos")  # (before the check: textual-inversion's parser looks for them)
        if masks:
            runs.copy_in(runs.upload_paths(masks), mask_dir)
        problem = forms.check_argv(argv)
        if problem:
            shutil.rmtree(folder, ignore_errors=True)
            return problem
        record = {"argv": argv, "max_steps": form.max_train_steps, "method": form.method, "created": time.time()}
        runs.write_json(folder / runs.RUN_FILE, record)
        app.train_job = app.slot.start(Job("train", argv, folder / "ui-train.log"))
    except (UserError, Busy, OSError) as e:
        shutil.rmtree(folder, ignore_errors=True)  # ours, just made, holding only copies
        return f"dbtrain: error: {e}"
    app.train_run = {"folder": str(folder), **record}
    return ""


def stop(app):
    """Whatever is going (a training run, a sample, a FABRIC round) stops as Ctrl-C stops it."""
    why = app.slot.stop()
    return f"dbtrain: error: {why}" if why else ""


def resume(app):
    """`dbtrain train ... --resume_from_checkpoint latest` in the shown run's folder."""
    run = app.train_run
    if run is None:
        return "dbtrain: error: no run to resume; start one"
    busy = app.slot.busy()
    if busy:
        return f"dbtrain: error: {busy}; stop it first"
    folder = Path(run["folder"])
    if not runs.checkpoints(folder / "model"):
        return f"dbtrain: error: {folder / 'model'} has no checkpoint to resume from; start a new run"
    argv = [*run["argv"], "--resume_from_checkpoint", "latest"]
    try:
        app.train_job = app.slot.start(Job("train", argv, folder / "ui-train.log"))
    except Busy as e:
        return f"dbtrain: error: {e}"
    return ""


def run_state(app) -> tuple[str, str, list, str, str, str]:
    """(progress, loss plot, validation grids, console, run folder + command line, message) of the shown run."""
    run = app.train_run
    if run is None:
        return plot.progress_html(0, None, "no run yet"), plot.loss_svg([]), [], "", "", ""
    folder = Path(run["folder"])
    records = runs.read_log(folder / "model")
    job = app.train_job
    mine = job is not None and Path(job.log).parent == folder
    step = records[-1]["step"] if records else 0
    message = ""
    if mine and job.running:
        state = "stopping: finishing this step, saving a checkpoint" if job.stop_requested else "running"
    elif mine and job.returncode == 0:
        state, step = "finished", run["max_steps"] or step
    elif mine and job.returncode is not None:
        message = job.message() or ""
        state = "stopped: Resume continues it" if job.stop_requested or job.returncode in (130, 143) else "failed"
    elif app.slot.adopted is not None and app.slot.adopted[1].parent == folder and app.slot.orphan():
        state = f"running (started by an earlier dbtrain ui, pid {app.slot.adopted[0]}; Stop stops it)"
    elif (folder / "model" / "dreambooth.json").is_file():  # a run of an earlier app: what its folder says
        state, step = "finished", run["max_steps"] or step
    elif runs.checkpoints(folder / "model"):
        state = "stopped: Resume continues it"
    else:
        state = "not running"
    grids = [(str(p), p.stem) for p in runs.validation_images(folder / "model")]
    console = "\n".join(last_lines(folder / "ui-train.log", 15))
    where = f"run folder: `{folder}`\n\n```\n{command_line(run['argv'])}\n```"
    return (plot.progress_html(step, run["max_steps"], state), plot.loss_svg(records, run["max_steps"]), grids,
            console, where, message)


def build(app) -> None:
    form = forms.TrainForm(model=str(app.opts.model))
    res = forms.native_resolution(form.model)
    with gr.Row():
        with gr.Column(scale=1):
            photos = gr.File(file_count="multiple", file_types=["image"], label="photos of the subject (3-20)",
                             elem_id="train-photos")
            masks = gr.File(file_count="multiple", file_types=["image"], elem_id="train-masks",
                            label="masks (optional; a mask shares its photo's name; white trains, black is ignored)")
            shown = gr.Gallery(label="as the trainer reads them", columns=5, height=260, elem_id="train-preview")
        with gr.Column(scale=1):
            model = gr.Textbox(form.model, label="base model (a diffusers folder; the built-in tiny model by default)")
            method = gr.Radio(list(forms.METHODS), value=form.method, label="method")
            with gr.Row():
                identifier = gr.Textbox(form.identifier, label="identifier [V]", elem_id="train-identifier")
                class_noun = gr.Textbox(form.class_noun, label="class", elem_id="train-class")
                initializer = gr.Textbox("", label="new token starts from (TI, pivotal; empty: the class)")
            instance_prompt = gr.Textbox(form.instance_prompt, label="instance prompt ({class}: the class)")
            with gr.Row():
                steps = gr.Number(form.max_train_steps, label="steps", precision=0, elem_id="train-steps")
                lr = gr.Number(form.learning_rate, label="learning rate")
                resolution = gr.Number(res, label="resolution", precision=0)
                batch = gr.Number(form.train_batch_size, label="batch size", precision=0)
            with gr.Row():
                prior = gr.Checkbox(form.prior_preservation, label="prior preservation (class images)")
                n_class = gr.Number(form.num_class_images, label="class images", precision=0)
                rank = gr.Number(form.lora_rank, label="LoRA rank", precision=0)
            with gr.Row():
                precision = gr.Dropdown(["no", "fp16", "bf16"], value=form.mixed_precision, label="mixed precision")
                optimizer = gr.Dropdown(["adamw8bit", "adamw4bit", "adamw"], value=form.optimizer,
                                        label="optimizer", allow_custom_value=True)
                device = gr.Dropdown(["auto", "cuda", "cpu"], value=form.device, label="device")
            with gr.Row():
                checkpointing = gr.Checkbox(form.gradient_checkpointing, label="gradient checkpointing")
                masked = gr.Checkbox(form.masked_loss, label="masked loss (alpha channel or the masks)")
            with gr.Row():
                val_prompt = gr.Textbox(form.validation_prompt, label="validation prompt", scale=3)
                val_steps = gr.Number(form.validation_steps, label="every N steps", precision=0,
                                      elem_id="train-val-steps")
                ckpt_steps = gr.Number(form.checkpointing_steps, label="checkpoint every", precision=0)
                seed = gr.Number(form.seed, label="seed", precision=0)
            other = gr.Textbox("", label="other flags (as on the command line, e.g. --snr_gamma 5 --use_ema)",
                               elem_id="train-other")
    values = [model, method, identifier, class_noun, instance_prompt, initializer, steps, lr, resolution, batch,
              prior, n_class, rank, precision, checkpointing, optimizer, masked, val_prompt, val_steps, ckpt_steps,
              seed, device, other]
    with gr.Row():
        card = gr.Dropdown([str(c) for c in forms.CARDS_GB], value="24", label="card (GB)", scale=0, min_width=100)
        fit = gr.Button("Will it fit?", elem_id="train-fit")
        go = gr.Button("Start", variant="primary", elem_id="train-start")
        halt = gr.Button("Stop (as Ctrl-C: a run saves a checkpoint)", variant="stop", elem_id="train-stop")
        again = gr.Button("Resume", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    verdict = gr.Markdown(elem_id="train-verdict")
    with gr.Accordion("the estimate's whole report", open=False):
        report = gr.Textbox(lines=12, show_label=False, elem_id="train-report")
    progress = gr.HTML(elem_id="train-progress")
    with gr.Row():
        loss = gr.HTML(elem_id="train-loss")
        grids = gr.Gallery(label="validation images", columns=3, height=300, elem_id="train-validation")
    where = gr.Markdown(elem_id="train-where")
    console = gr.Textbox(label="console (the run's output)", lines=8, max_lines=15, elem_id="train-console")
    run_message = gr.Markdown(elem_id="train-run-message")

    for trigger in (photos.change, masks.change, masked.change):
        trigger(show_photos, [photos, masks, masked], [shown, message])
    fit.click(will_it_fit, [card, *values], [verdict, report])
    go.click(lambda *v: start(app, *v), [photos, masks, *values], message)
    halt.click(lambda: stop(app), None, message)
    again.click(lambda: resume(app), None, message)
    seen = gr.State({})

    def refresh(last):
        """The run's state; an output that did not change is skipped (no flicker of the gallery)."""
        now = run_state(app)
        out = [gr.skip() if last.get(k) == v else v for k, v in enumerate(now)]
        return [dict(enumerate(now)), *out]

    timer = gr.Timer(REFRESH_S)
    timer.tick(refresh, seen, [seen, progress, loss, grids, console, where, run_message], show_progress="hidden")
