"""The Sample page: `dbtrain sample` from a model or a run's output folder, with LoRA / embedding files, into a
new folder of the run (RUN/samples/sample-...) or, for another model, of the app (RUNS/samples/sample-...)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer.ui import runs
from trainer.ui.jobs import Busy, Job, command_line


def samples_folder(app, model: str) -> Path:
    """A new folder for the images: beside the run whose model they come from, else the app's samples/."""
    model_dir = Path(model).resolve()
    root = app.runs_dir
    if model_dir.parent.parent == root and model_dir.name == "model":  # RUNS/<run>/model
        return runs.new_folder(model_dir.parent / "samples", "sample")
    return runs.new_folder(root / "samples", "sample")


def sample_argv(model, prompt, negative, num_images, steps, guidance, seed, device, out: Path, loras, embeddings,
                lora_scale) -> list[str]:
    argv = ["sample", "--model", model, "--prompt", prompt, "--num_images", str(int(num_images)),
            "--steps", str(int(steps)), "--guidance", f"{float(guidance):g}", "--seed", str(int(seed)),
            "--out", str(out)]
    if negative:
        argv += ["--negative_prompt", negative]
    if device != "auto":
        argv += ["--device", device]
    if loras:
        argv += ["--lora", *map(str, loras), "--lora_scale", f"{float(lora_scale):g}"]
    if embeddings:
        argv += ["--embedding", *map(str, embeddings)]
    return argv


def generate(app, model, prompt, negative, num_images, steps, guidance, seed, device, lora_files, embedding_files,
             lora_scale):
    """(gallery, message, where): the images of one `dbtrain sample` run, or the CLI's one-line message."""
    model = str(model or "").strip()
    if not model or not str(prompt or "").strip():
        return [], "dbtrain: error: give a model and a prompt", ""
    busy = app.slot.busy()
    if busy:
        return [], f"dbtrain: error: {busy}; sample when it has ended (or Stop it on the Train page)", ""
    try:
        out = samples_folder(app, model)
    except OSError as e:
        return [], f"dbtrain: error: cannot make a folder for the images: {e}", ""
    try:
        # copies of the uploaded files beside the images: the command line shown stays true after the upload
        loras = runs.copy_in(runs.upload_paths(lora_files), out / "inputs") if lora_files else []
        embeddings = runs.copy_in(runs.upload_paths(embedding_files), out / "inputs") if embedding_files else []
        argv = sample_argv(model, prompt, negative, num_images, steps, guidance, seed, device, out / "images",
                           loras, embeddings, lora_scale)
        job = app.slot.run(Job("sample", argv, out / "ui-sample.log"))
    except (TypeError, ValueError, OSError, Busy) as e:
        shutil.rmtree(out, ignore_errors=True)  # ours, just made
        return [], f"dbtrain: error: {e}", ""
    where = f"saved in `{out / 'images'}`\n\n```\n{command_line(argv)}\n```"
    if job.returncode != 0:
        return [], job.message() or "dbtrain sample failed", where
    shown = [(str(p), p.name) for p in runs.images_in(out / "images") if p.name != "grid.png"]
    return shown, "", where


@dataclass
class SamplePage:
    model: gr.Dropdown
    refresh_models: object


def build(app) -> SamplePage:
    choices = app.model_choices()
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(choices, value=choices[0][1], allow_custom_value=True, elem_id="sample-model",
                                label="model: a run's output folder, a checkpoint folder or any diffusers folder")
            prompt = gr.Textbox(label="prompt", placeholder="a sks star on the beach", elem_id="sample-prompt")
            negative = gr.Textbox(label="negative prompt (optional)")
            with gr.Row():
                num_images = gr.Number(4, label="images", precision=0, minimum=1, maximum=64)
                steps = gr.Number(25, label="steps", precision=0, minimum=1)
                guidance = gr.Number(7.5, label="guidance")
                seed = gr.Number(0, label="seed", precision=0)
                device = gr.Dropdown(["auto", "cuda", "cpu"], value="auto", label="device")
            with gr.Row():
                loras = gr.File(file_count="multiple", file_types=[".safetensors", ".bin", ".pt"],
                                label="LoRA files (diffusers or kohya)")
                embeddings = gr.File(file_count="multiple", file_types=[".safetensors", ".bin", ".pt"],
                                     label="embedding files (Textual Inversion)")
            lora_scale = gr.Number(1.0, label="LoRA strength")
            go = gr.Button("Generate", variant="primary", elem_id="sample-go")
        with gr.Column():
            gallery = gr.Gallery(label="images", columns=4, height=420, elem_id="sample-gallery")
            message = gr.Markdown(elem_id="sample-message")
            where = gr.Markdown(elem_id="sample-where")
    go.click(lambda *v: generate(app, *v),
             [model, prompt, negative, num_images, steps, guidance, seed, device, loras, embeddings, lora_scale],
             [gallery, message, where])

    def refresh_models(current=None):
        return gr.update(choices=app.model_choices())

    return SamplePage(model=model, refresh_models=refresh_models)
