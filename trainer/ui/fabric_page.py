"""The FABRIC page: a prompt gives a round of images, each with like / dislike; "Next round" draws new images
steered by all the feedback so far (trainer.ui.fabric_rounds); earlier rounds stay visible, the liked images
can be downloaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from trainer.ui import fabric_rounds as fr
from trainer.ui.jobs import Busy, Job, command_line

MARK = {"liked": "liked", "disliked": "disliked", None: ""}


def _view(s: dict | None, message: str = "") -> list:
    """Every output of the page for session `s`: the slots (image, verdict) of the last round, the earlier
    rounds, the liked files, the message, the command line."""
    last = s["rounds"][-1]["images"] if s and s["rounds"] else []
    out = []
    for k in range(fr.MAX_IMAGES):
        shown = k < len(last)
        v = s["verdicts"].get(last[k]) if shown else None
        out += [gr.update(value=last[k] if shown else None, visible=shown),
                gr.update(value=f"**{MARK[v]}**" if v else "", visible=shown),
                gr.update(visible=shown), gr.update(visible=shown)]
    liked = fr.liked_copies(s) if s else []
    where = ""
    if s and s["rounds"]:
        r = s["rounds"][-1]
        where = f"round {r['round']} in `{Path(r['argv'][r['argv'].index('--out') + 1])}`\n\n```\n" \
                f"{command_line(r['argv'])}\n```"
    counts = (f"round {len(s['rounds'])}: {len(liked)} liked, {len(fr.feedback(s, 'disliked'))} disliked so far"
              if s and s["rounds"] else "")
    return [*out, fr.earlier(s) if s else [], liked or None, message, where, counts]


def _run_round(app, s: dict) -> tuple[dict, str]:
    busy = app.slot.busy()
    if busy:
        return s, f"dbtrain: error: {busy}; draw a round when it has ended (or Stop it on the Train page)"
    argv = fr.next_round_argv(s)
    try:
        job = app.slot.run(Job("fabric", argv, Path(s["folder"]) / "ui-fabric.log"))
    except Busy as e:
        return s, f"dbtrain: error: {e}"
    if job.returncode != 0:
        return s, job.message() or "dbtrain fabric failed"
    return fr.add_round(s, argv), ""


def first_round(app, model, prompt, negative, num_images, steps, seed, device):
    if not str(prompt or "").strip() or not str(model or "").strip():
        return [None, *_view(None, "dbtrain: error: give a model and a prompt")]
    try:
        n = int(num_images)
        if not 1 <= n <= fr.MAX_IMAGES:
            raise ValueError(f"images per round must be 1 to {fr.MAX_IMAGES}, got {n}")
        s = fr.new_session(app.runs_dir, model=str(model).strip(), prompt=str(prompt).strip(),
                           negative=str(negative or "").strip(), num_images=n, steps=int(steps), seed=int(seed),
                           device=device)
    except (TypeError, ValueError, OSError) as e:
        return [None, *_view(None, f"dbtrain: error: {e}")]
    s, message = _run_round(app, s)
    return [s, *_view(s, message)]


def next_round(app, s):
    if not s or not s["rounds"]:
        return [s, *_view(s, "dbtrain: error: start with a first round")]
    s, message = _run_round(app, s)
    return [s, *_view(s, message)]


def give(s, k: int, verdict: str):
    """Like / dislike image k of the last round (the same button again takes it back)."""
    if s:
        s = fr.give(s, k, verdict)
    return [s, *_view(s)]


@dataclass
class FabricPage:
    model: gr.Dropdown
    refresh_models: object


def build(app) -> FabricPage:
    choices = app.model_choices()
    session = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(choices, value=choices[0][1], allow_custom_value=True, scale=2, elem_id="fabric-model",
                            label="model (a diffusers SD 1.x/2.x folder)")
        prompt = gr.Textbox(label="prompt", placeholder="a star on the beach", scale=3, elem_id="fabric-prompt")
        negative = gr.Textbox(label="negative prompt (optional)", scale=2)
    with gr.Row():
        num_images = gr.Number(4, label=f"images per round (1-{fr.MAX_IMAGES})", precision=0, minimum=1,
                               maximum=fr.MAX_IMAGES)
        steps = gr.Number(20, label="steps", precision=0, minimum=1)
        seed = gr.Number(0, label="seed", precision=0)
        device = gr.Dropdown(["auto", "cuda", "cpu"], value="auto", label="device")
        first = gr.Button("First round", variant="primary", elem_id="fabric-first")
        again = gr.Button("Next round (all feedback so far)", elem_id="fabric-next")
    message = gr.Markdown(elem_id="fabric-message")
    counts = gr.Markdown(elem_id="fabric-counts")
    slots = []
    with gr.Row():
        for k in range(fr.MAX_IMAGES):
            with gr.Column(min_width=120):
                image = gr.Image(visible=False, show_label=False, interactive=False, elem_id=f"fabric-img-{k}",
                                 height=200)
                mark = gr.Markdown(visible=False, elem_id=f"fabric-mark-{k}")
                with gr.Row():
                    like = gr.Button("like", size="sm", visible=False, elem_id=f"fabric-like-{k}")
                    dislike = gr.Button("dislike", size="sm", visible=False, elem_id=f"fabric-dislike-{k}")
            slots.append((image, mark, like, dislike))
    earlier = gr.Gallery(label="earlier rounds", columns=8, height=220, elem_id="fabric-earlier")
    liked = gr.File(label="liked images (download)", file_count="multiple", interactive=False, elem_id="fabric-liked")
    where = gr.Markdown(elem_id="fabric-where")
    view = [c for slot in slots for c in slot] + [earlier, liked, message, where, counts]

    # one FABRIC event at a time: a like given while the next round is drawn is not lost to its state
    one = dict(concurrency_id="fabric", concurrency_limit=1)
    first.click(lambda *v: first_round(app, *v), [model, prompt, negative, num_images, steps, seed, device],
                [session, *view], **one)
    again.click(lambda s: next_round(app, s), session, [session, *view], **one)
    for k, (_, _, like, dislike) in enumerate(slots):
        for button, verdict in ((like, "liked"), (dislike, "disliked")):
            button.click(lambda s, k=k, verdict=verdict: give(s, k, verdict), session, [session, *view], **one)

    def refresh_models():
        return gr.update(choices=app.model_choices())

    return FabricPage(model=model, refresh_models=refresh_models)
