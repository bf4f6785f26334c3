"""The Train page's form as a `dbtrain` command line: the few options that matter, each a flag of `dbtrain
train` (or `dbtrain textual-inversion`), plus the user's other flags as typed. The command line is checked
here with the CLI's own parser, so bad input comes back as the CLI's one line before anything starts.
No Gradio here."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.options.sampling import BUILTIN_MODEL

METHODS = ("DreamBooth", "LoRA", "Textual Inversion", "Pivotal tuning")
MIN_PHOTOS, MAX_PHOTOS = 3, 20
CARDS_GB = (6, 8, 10, 12, 16, 24, 32, 48, 80)


@dataclass
class TrainForm:
    """What the Train page asks; the defaults are the built-in model's demo recipe where it has one."""

    model: str = str(BUILTIN_MODEL)
    method: str = "DreamBooth"
    identifier: str = "sks"
    class_noun: str = "star"
    instance_prompt: str = "a [V] {class}"  # {class}: the class noun; [V]: the identifier
    initializer_token: str = ""  # Textual Inversion / pivotal tuning: the word the new token starts from
    max_train_steps: int = 300
    learning_rate: float = 1e-4
    resolution: int | None = None  # not given: the model's own
    train_batch_size: int = 1
    prior_preservation: bool = False
    num_class_images: int = 50
    lora_rank: int = 8
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw8bit"
    masked_loss: bool = False
    validation_prompt: str = "a [V] {class} on the beach"
    validation_steps: int = 50
    checkpointing_steps: int = 100
    seed: int = 0
    device: str = "auto"
    other_flags: str = ""

    def prompt(self, template: str) -> str:
        return template.replace("{class}", self.class_noun.strip())


def native_resolution(model: str) -> int | None:
    """The model's own image size: the UNet's sample_size times the VAE's downscale (64 for the built-in model,
    512 for SD 1.5, 1024 for SDXL); None where the configs do not say."""
    try:
        unet = json.loads((Path(model) / "unet" / "config.json").read_text())
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        size = unet["sample_size"]
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# What the page sets itself: where the run reads and writes (its own folder) and the step count it plots
OWNED = ("--pretrained_model_name_or_path", "--output_dir", "--instance_data_dir", "--train_data_dir",
         "--class_data_dir", "--logging_dir", "--mask_dir", "--conditioning_data_dir", "--max_train_steps",
         "--num_train_epochs", "--resume_from_checkpoint", "--log_every", "--concepts", "--concepts_list")
_REDIRECT = threading.Lock()  # contextlib's redirects swap sys.stdout/stderr for the whole process


def other_flags(text: str) -> list[str]:
    """The "other flags" box, split as a shell splits it; a flag the page sets itself is refused (argparse
    would take the last one, abbreviations included, and the run would write outside its folder)."""
    try:
        args = shlex.split(text or "")
    except ValueError as e:
        raise UserError(f"other flags: {e} (quote values with spaces, close every quote)") from e
    for a in args:
        name = a.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--"):
            owned = [f for f in OWNED if f.startswith(name)]
            if owned:
                raise UserError(f"other flags: {owned[0]} is set by the page (the model field, the steps field, "
                                f"or the run's own folder); leave it out")
    return args


def train_argv(form: TrainForm, run: Path, *, mask_dir: Path | None = None) -> list[str]:
    """The arguments after `dbtrain` for a run in folder `run` (photos in run/photos, the model into
    run/model, class images into run/class-images)."""
    if form.method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {form.method!r}")
    if not form.identifier.strip() or len(form.identifier.split()) != 1:
        raise UserError(f"the identifier must be one word such as sks, got {form.identifier!r}")
    init = form.initializer_token.strip() or form.class_noun.strip()
    res = form.resolution or native_resolution(form.model) or 512
    photos, out = run / "photos", run / "model"
    common = ["--pretrained_model_name_or_path", form.model, "--output_dir", str(out), "--resolution", str(res),
              "--train_batch_size", str(form.train_batch_size), "--max_train_steps", str(form.max_train_steps),
              "--learning_rate", repr(form.learning_rate), "--mixed_precision", form.mixed_precision,
              "--optimizer", form.optimizer, "--checkpointing_steps", str(form.checkpointing_steps),
              "--seed", str(form.seed), "--log_every", "1"]
    if form.validation_prompt.strip():
        common += ["--validation_prompt", form.prompt(form.validation_prompt), "--validation_steps",
                   str(form.validation_steps)]
    if form.gradient_checkpointing:
        common.append("--gradient_checkpointing")
    if form.device != "auto":
        common += ["--device", form.device]
    if mask_dir is not None:
        common += ["--mask_dir", str(mask_dir)]
    elif form.masked_loss:
        common.append("--masked_loss")
    if form.method == "Textual Inversion":
        argv = ["textual-inversion", "--train_data_dir", str(photos), "--placeholder_token", f"<{form.identifier}>",
                "--initializer_token", init, *common]
    else:
        argv = ["train", "--instance_data_dir", str(photos), "--instance_prompt", form.prompt(form.instance_prompt),
                "--identifier", form.identifier, *common]
        if form.method == "LoRA":
            argv += ["--lora_rank", str(form.lora_rank)]
        elif form.method == "Pivotal tuning":
            argv += ["--train_text_embedding", "--initializer_token", init]
        if form.prior_preservation:
            argv += ["--with_prior_preservation", "--class_prompt", f"a {form.class_noun.strip()}",
                     "--class_data_dir", str(run / "class-images"), "--num_class_images", str(form.num_class_images)]
    return argv + other_flags(form.other_flags)


def check_argv(argv: list[str]) -> str | None:
    """The CLI's one-line message for these flags (parsed and checked as `dbtrain` does, before torch), or None."""
    from trainer.options import textual_inversion, train

    parse = textual_inversion.parse if argv[0] == "textual-inversion" else train.parse
    err = io.StringIO()
    try:
        with _REDIRECT, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv[1:])
    except UserError as e:
        return f"dbtrain: error: {e}"
    except SystemExit:  # argparse: usage, then "dbtrain train: error: ..."
        lines = [ln for ln in err.getvalue().splitlines() if ": error:" in ln]
        return lines[-1] if lines else "dbtrain: error: the flags do not parse"
    return None


def check_photos(n: int) -> str | None:
    if n < MIN_PHOTOS or n > MAX_PHOTOS:
        return (f"dbtrain: error: give {MIN_PHOTOS} to {MAX_PHOTOS} photos of the subject (DreamBooth's range), "
                f"got {n}")
    return None


def verdict(report: str) -> tuple[str, str]:
    """The estimate's verdict line ("predicted peak: ...: fits the 12 GB card, ...") and what follows it in the
    report when it does not fit (the flags that would make it fit, in order)."""
    lines = report.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("predicted peak"):
            advice = []
            for more in lines[k + 1:]:
                if more.startswith("where the GPU run differs"):
                    break
                advice.append(more)
            return line, "\n".join(advice).strip()
    return "", ""
