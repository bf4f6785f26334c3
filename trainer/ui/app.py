"""`dbtrain ui`'s web app: three pages (Train, Sample, FABRIC) on Gradio, over `dbtrain` child processes.

The app holds one child process at a time (trainer.ui.jobs.Slot) and writes only into new folders under
--runs_dir (trainer.ui.runs). Its state is the server's, not the browser tab's: a reloaded page shows the run
that is going."""
from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from trainer.options.sampling import BUILTIN_MODEL
from trainer.options.ui import UiOptions
from trainer.ui import fabric_page, sample_page, train_page
from trainer.ui.jobs import Job, Slot
from trainer.ui.runs import latest_run, model_folders

# system fonts only: the default theme asks Google's font servers, which a machine offline cannot reach
FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO = ["ui-monospace", "Menlo", "Consolas", "monospace"]
CSS = """
#train-message, #sample-message, #fabric-message { color: #c92a2a; }
.run-progress progress { accent-color: #e8590c; }
"""


@dataclass
class App:
    """What every page shares: the options, the one child process, the training run the Train page shows."""

    opts: UiOptions
    slot: Slot = field(default_factory=Slot)
    train_run: dict | None = None  # {"folder", "argv", "max_steps", "method"} of the last run started
    train_job: Job | None = None  # its last child process (the slot's may be a sample or a FABRIC round since)

    def __post_init__(self):
        self.train_run = latest_run(self.runs_dir)  # a restarted app shows its last run; Resume continues it
        # a child of an earlier app still running (that app was killed) holds the slot until it ends
        root = self.runs_dir
        self.slot.adopt([*root.glob("*/ui-*.pid"), *root.glob("samples/*/ui-*.pid"), *root.glob("*/samples/*/ui-*.pid")])

    @property
    def runs_dir(self) -> Path:
        return Path(self.opts.runs_dir).resolve()

    def model_choices(self) -> list[tuple[str, str]]:
        """(label, folder) for the model menus: the base model, the built-in one, the app's finished runs."""
        out = [(f"base model: {self.opts.model}", str(self.opts.model))]
        if Path(self.opts.model).resolve() != BUILTIN_MODEL.resolve():
            out.append(("built-in tiny model", str(BUILTIN_MODEL)))
        out += [(f"run {p.parent.name}", str(p)) for p in model_folders(self.runs_dir)]
        return out


def build(opts: UiOptions) -> gr.Blocks:
    app = App(opts)
    atexit.register(app.slot.stop_all)  # the app's exit stops a run as Ctrl-C does: its checkpoint saved
    theme = gr.themes.Default(primary_hue="orange", font=FONTS, font_mono=MONO)
    with gr.Blocks(title="dbtrain", analytics_enabled=False) as blocks:
        gr.Markdown("## dbtrain: DreamBooth in a browser\nEvery run is a `dbtrain` command, shown on its page; "
                    f"everything is written under `{app.runs_dir}`.")
        with gr.Tab("Train", id="train"):
            train_page.build(app)
        with gr.Tab("Sample", id="sample") as sample_tab:
            sample = sample_page.build(app)
        with gr.Tab("FABRIC", id="fabric") as fabric_tab:
            fabric = fabric_page.build(app)
        # the menus learn the runs finished since the page was opened
        sample_tab.select(sample.refresh_models, None, sample.model)
        fabric_tab.select(fabric.refresh_models, None, fabric.model)
    blocks.dbtrain_theme, blocks.dbtrain_css = theme, CSS
    return blocks


def launch(opts: UiOptions, *, block: bool = True):
    blocks = build(opts)
    blocks.queue(default_concurrency_limit=4)
    return blocks.launch(server_name=opts.host, server_port=opts.port, prevent_thread_lock=not block,
                         theme=blocks.dbtrain_theme, css=blocks.dbtrain_css, show_error=True, quiet=False,
                         inbrowser=False, ssr_mode=False, allowed_paths=[str(Path(opts.runs_dir).resolve())])
