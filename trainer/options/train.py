"""The options of a training run, one dataclass per concern, and `dbtrain train`'s flags.

Every field is a flag under diffusers' train_dreambooth.py name where it has one (dbtrain's own
otherwise); `TRAIN_LAYOUT` groups them for --help. `parse(argv)` gives a checked TrainOptions
with diffusers' flags mapped onto ours (each said in a note line). No torch here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from trainer.options import spec
from trainer.options.spec import flag, on_off

INTERPOLATIONS = ("bilinear", "nearest", "nearest_exact", "bicubic", "box", "hamming", "lanczos")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw8bit", "adamw4bit", "adamw", "bnb8bit")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
DEFAULT_STEPS = 800  # --max_train_steps when neither it nor --num_train_epochs is given


@dataclass
class ModelOptions:
    pretrained_model_name_or_path: str | None = flag(
        None, "local diffusers folder of the base model (SD 1.x / 2.x); required, nothing is downloaded", metavar="DIR")
    revision: str | None = flag(None, "hub revision of the base model: a local folder has none, so it is ignored "
                                "with a note (check that revision out into a folder instead)", metavar="REV")
    variant: str | None = flag(None, "load the base model's weight variant, e.g. fp16: the *.fp16.safetensors files "
                               "of its folders (not given: the plain files)", metavar="NAME")
    tokenizer_name: str | None = flag(None, "a local tokenizer folder to use instead of the base model's tokenizer/ "
                                      "(not given: the model's)", metavar="DIR")
    pretrained_vae_model_name_or_path: str | None = flag(
        None, "a local VAE folder (AutoencoderKL) to use instead of the model's vae/, e.g. an fp16-safe SDXL VAE "
        "(train_dreambooth_lora_sdxl.py's flag)", metavar="DIR")


@dataclass
class DataOptions:
    instance_data_dir: str | None = flag(None, "folder with the 3-5 subject images; required", metavar="DIR")
    instance_prompt: str | None = flag(None, 'prompt of the subject images, e.g. "a photo of [V] dog" ([V] becomes '
                                       "--identifier); required", metavar="TEXT")
    caption_extension: str | None = flag(
        None, "per-image captions (kohya's convention): photo.txt beside photo.png is that image's instance prompt "
        "([V] substituted); images without one use --instance_prompt (not given: --instance_prompt for all)",
        metavar="EXT")
    identifier: str = flag("sks", 'the rare token that replaces [V], or "auto" to pick one from the tokenizer as the '
                           "paper does", metavar="WORD")
    resolution: int = flag(512, "training image size in pixels (a multiple of 8)", type=int)
    center_crop: bool = flag(False, "crop non-square images at the center instead of at random")
    random_flip: bool = flag(False, "random horizontal flip of the training images")
    image_interpolation_mode: str | None = flag(
        None, "resize filter of the training images (not given: bilinear, as train_dreambooth.py; "
        "train_dreambooth_lora.py's is lanczos)", choices=INTERPOLATIONS)
    image_fit: str = flag("cover", "cover: the short side resized to --resolution, then a square cropped (diffusers' "
                          "DreamBooth scripts); squash: the whole image (with --center_crop its centre square) "
                          "resized to the square, distorting non-square images (diffusers' textual_inversion.py)",
                          choices=("cover", "squash"))
    tokenizer_max_length: int | None = flag(None, "tokens per prompt (not given: the tokenizer's model_max_length, "
                                            "77 for CLIP)", type=int)
    text_encoder_use_attention_mask: bool = flag(False, "pass the padding mask to the text encoder")
    prompt_without_identifier: bool = flag(False, "train although --instance_prompt names neither [V] nor the "
                                           "identifier (a note says so; not given: such a prompt is refused)")
    dataloader_num_workers: int = flag(0, "accepted: dbtrain has no DataLoader (images are decoded once, their "
                                       "latents cached)", type=int)
    # Textual Inversion (textual_inversion.py's flags; dbtrain train has none of them)
    learnable_property: str = flag("object", "prompt templates of the original work: objects or styles",
                                   choices=("object", "style"))
    repeats: int = flag(100, "images repeated this many times per epoch, as textual_inversion.py: an epoch is "
                        "ceil(ceil(images x N / batch) / accumulation) steps (--num_train_epochs, "
                        "--validation_epochs); images are drawn at random every step, so only those counts change",
                        type=int)
    prompt_templates: list[str] | None = None  # Textual Inversion's templates, "{}" the placeholder (no flag)
    # what kohya / OneTrainer users train with (trainer.core.buckets, masks, concepts; captions below)
    masked_loss: bool = flag(False, "train only where the subject is: a per-pixel loss weight from each image's alpha "
                             "channel, or from --mask_dir (white = train, black = ignore)")
    mask_dir: str | None = flag(None, "folder of mask images with the instance images' file names (kohya's "
                                "conditioning_data_dir convention, any image suffix); implies --masked_loss",
                                aliases=("--conditioning_data_dir",), metavar="DIR")
    mask_min: float = flag(0.0, "floor of the mask weight, in [0, 1): the background is down-weighted to this instead "
                           "of ignored (0: kohya's, ignored)", type=float)
    mask_normalization: str = flag("none", "none: the masked loss's plain mean (kohya's); mean: divided by the "
                                   "mask's mean per image, so a small subject trains as strongly as a large one",
                                   choices=("none", "mean"))
    aspect_ratio_buckets: str | None = flag(
        None, 'train at several aspect ratios instead of center squares: "auto" (buckets at the training area, sides '
        'multiples of --bucket_reso_steps) or a list "h,w;h,w;..." in pixels (diffusers\' syntax); a batch is one '
        "bucket", metavar="auto|H,W;...")
    enable_bucket: bool = flag(False, "kohya's switch: --aspect_ratio_buckets auto")
    bucket_reso_steps: int = flag(64, "sides of the automatic buckets are multiples of this (pixels, a multiple of 8)",
                                  type=int)
    caption_dropout: float = flag(0.0, "probability that a row trains on the empty prompt (diffusers' and kohya's "
                                  "caption dropout)", aliases=("--caption_dropout_rate",), type=float)
    shuffle_caption: bool = flag(False, "shuffle the comma-separated parts of each caption every step (kohya)")
    keep_tokens: int = flag(0, "with --shuffle_caption: the first N comma-separated parts stay in front (kohya)",
                            type=int)
    concepts: str | None = flag(
        None, "several subjects in one run: a JSON or TOML list of {instance_data_dir, instance_prompt, class_prompt, "
        "class_data_dir, repeats} (the DreamBooth forks' concepts_list); replaces --instance_data_dir and its prompts",
        aliases=("--concepts_list",), metavar="FILE")


@dataclass
class PriorOptions:
    with_prior_preservation: bool = flag(False, "also train on class images of the frozen model (keeps the class "
                                         "prior)")
    class_data_dir: str | None = flag(None, "folder of class images; missing ones are generated there", metavar="DIR")
    class_prompt: str | None = flag(None, 'prompt of the class images, e.g. "a photo of dog"', metavar="TEXT")
    num_class_images: int = flag(100, "class images to use (generated if fewer exist)", type=int)
    prior_loss_weight: float = flag(1.0, "weight of the class term of the loss", type=float)
    sample_batch_size: int = flag(4, "batch size when generating class images", type=int)
    prior_generation_precision: str | None = flag(
        None, "dtype of the pipeline that draws the class images (not given or no: the --mixed_precision dtype on a "
        "GPU, fp32 on a CPU)", choices=("no", "fp32", "fp16", "bf16"))
    class_inference_steps: int = flag(50, "denoising steps per generated class image", type=int)


@dataclass
class TrainingOptions:
    seed: int = flag(0, "seed of every random draw (same seed, same run)", type=int)
    train_text_encoder: bool = flag(False, "fine-tune the text encoder too")
    train_batch_size: int = flag(1, "instance images per step (as many class images)", type=int)
    max_train_steps: int | None = flag(None, f"optimizer steps of the run; not given: from --num_train_epochs if "
                                       f"that is given (default: {DEFAULT_STEPS})", type=int)
    num_train_epochs: int | None = flag(None, "passes over the images; --max_train_steps = epochs x "
                                        "ceil(ceil(images / batch) / accumulation), as diffusers (a given "
                                        "--max_train_steps wins)", type=int)
    gradient_accumulation_steps: int = flag(1, "forward/backward passes per optimizer step", type=int)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)", type=float)
    snr_gamma: float | None = flag(None, "min-SNR loss weighting gamma, e.g. 5.0 (not given: off)", type=float)
    offset_noise: float = flag(0.0, "offset-noise strength; alone it means diffusers' switch, 0.1 (0 = off)",
                               type=float, nargs="?", const=0.1)
    loss_type: str = flag("l2", "l2: squared error; huber: pseudo-Huber 2c(sqrt(e^2+c^2)-c); smooth_l1: "
                          "2(sqrt(e^2+c^2)-c) (kohya's names; the robust ones damp outlier pictures)",
                          choices=LOSS_TYPES)
    huber_c: float = flag(0.1, "c of the huber and smooth_l1 losses (kohya's default)", type=float)
    huber_schedule: str = flag("snr", "c per timestep: constant (huber_c), exponential (huber_c at t=T, 1 at t=0) or "
                               "snr (kohya's default: c grows as the noise falls)", choices=HUBER_SCHEDULES)
    class_labels_conditioning: str | None = flag(None, "pass the timesteps as the UNet's class_labels (for UNets "
                                                 "with a class embedding)", choices=("timesteps",))
    kernels: bool = flag(True, "on: dbkernels loss and attention; off: PyTorch's", type=on_off, metavar="on|off")
    log_every: int = flag(10, "a log line every this many steps", type=int)
    diffusers_defaults: bool = flag(False, "take the defaults of diffusers' script of this method (optimizer, batch, "
                                    "warm-up, flip, resize filter, ...) for every flag not given; the note at start "
                                    "lists them (not given: ours, and the note lists where they differ)")


@dataclass
class OptimizerOptions:
    optimizer: str = flag("adamw8bit", "adamw8bit: ours (8-bit states); adamw4bit: ours, 4-bit states (half "
                          "adamw8bit's memory); adamw: torch.optim.AdamW; bnb8bit: bitsandbytes", choices=OPTIMIZERS)
    learning_rate: float = flag(5e-6, "peak learning rate", type=float)
    scale_lr: bool = flag(False, "multiply the learning rate by accumulation steps x batch size x processes (1)")
    lr_scheduler: str = flag("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(0, "steps of linear warm-up", type=int)
    lr_num_cycles: int = flag(1, "cycles of cosine_with_restarts", type=int)
    lr_power: float = flag(1.0, "power of the polynomial schedule", type=float)
    adam_beta1: float = flag(0.9, "AdamW beta1", type=float)
    adam_beta2: float = flag(0.999, "AdamW beta2", type=float)
    adam_weight_decay: float = flag(1e-2, "AdamW decoupled weight decay", type=float)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", type=float)
    use_8bit_adam: bool = flag(False, "diffusers' switch: our 8-bit AdamW (--optimizer adamw8bit, already the "
                               "default)")


@dataclass
class MemoryOptions:
    gradient_checkpointing: bool = flag(False, "recompute activations in backward (less memory)")
    mixed_precision: str = flag("no", "autocast dtype; on a CPU fp16 runs 2-3x slower than no (bf16 about as fast "
                                "as no)", choices=("no", "fp16", "bf16"))
    allow_tf32: bool = flag(False, "TF32 matmuls and convolutions on Ampere+ GPUs")
    weights_dtype: str = flag("fp32", "fp32 master weights, or pure bf16 weights (stochastic rounding with "
                              "adamw8bit / adamw4bit)", choices=("fp32", "bf16"))
    step_in_backward: bool = flag(False, "optimizer step inside backward, gradients freed at once (adamw8bit, adamw4bit; less "
                                  "memory)")
    enable_xformers_memory_efficient_attention: bool = flag(False, "diffusers' switch: our fused attention kernels "
                                                            "(--kernels on) instead")
    set_grads_to_none: bool = flag(False, "accepted: gradients are always set to None")
    pre_compute_text_embeddings: bool = flag(False, "accepted: with a frozen text encoder the prompt embeddings are "
                                             "always computed once")
    card_gb: float | None = flag(None, "memory of the card to fit, in GB, e.g. 12: the estimate lists the flags that "
                                 "make the run fit it (not given: the GPU's, or the common card sizes)", type=float,
                                 metavar="GB")
    estimate_only: bool = flag(False, "print the memory estimate of this run (and what makes it fit --card_gb) and "
                               "exit without training")


@dataclass
class CheckpointOptions:
    output_dir: str = flag("dreambooth-model", "where the model, checkpoints and logs go: a new folder, an empty one, "
                           "or a previous dbtrain run (then with --resume_from_checkpoint latest)", metavar="DIR")
    checkpointing_steps: int = flag(500, "save output_dir/checkpoint-<step> every this many steps (and on Ctrl-C / "
                                    "SIGTERM)", type=int)
    checkpoints_total_limit: int | None = flag(None, "keep only the newest N checkpoints (not given: keep all)",
                                               type=int)
    resume_from_checkpoint: str | None = flag(None, 'continue from a checkpoint folder, or "latest" (the newest intact '
                                              "one; none yet: start at step 0)", metavar="PATH|latest")
    save_single_file: bool = flag(False, "also write the single-file .safetensors at the end")
    single_file_half: bool = flag(False, "write that single file in fp16")
    skip_save_text_encoder: bool = flag(False, "save the pipeline without its text_encoder/")
    # Textual Inversion (textual_inversion.py's flags)
    save_steps: int | None = flag(None, "write learned_embeds-steps-<N>.safetensors every N steps", type=int)
    save_as_full_pipeline: bool = flag(False, "accepted: the output is the embedding files; dbtrain sample --model "
                                       "OUTPUT_DIR loads them on the base model")
    no_safe_serialization: bool = flag(False, "accepted: embeddings are always written as .safetensors (plus the "
                                       "A1111 .pt)")


@dataclass
class LoggingOptions:
    logging_dir: str = flag("logs", "step log (train_log.jsonl) and TensorBoard folder, relative to output_dir",
                            metavar="DIR")
    report_to: str | None = flag(None, "tensorboard (event files when tensorboard is installed), wandb, comet_ml or "
                                 "all; the JSONL step log is always written (not given: tensorboard, without a note "
                                 "when it is not installed)", metavar="NAME")
    validation_prompt: str | None = flag(None, "prompt of the validation grids in output_dir/validation (not given: "
                                         "no validation)", metavar="TEXT")
    validation_steps: int = flag(100, "validation grid every this many steps", type=int)
    num_validation_images: int = flag(4, "images per validation grid", type=int)
    validation_scheduler: str | None = flag(None, "sampler of the validation grids (not given: the model's own)",
                                            choices=("DPMSolverMultistepScheduler", "DDPMScheduler"))
    validation_epochs: int | None = flag(None, "validation every this many epochs (sets --validation_steps; not "
                                         "given: --validation_steps)", type=int)
    validation_images: list[str] | None = flag(None, "accepted: input images of image-conditioned pipelines; SD "
                                               "text-to-image validation uses none", nargs="+", metavar="FILE")
    push_to_hub: bool = flag(False, "accepted, nothing is uploaded (no network); upload output_dir afterwards with "
                             "huggingface-cli upload")
    hub_token: str | None = flag(None, "accepted, never used nor stored", metavar="TOKEN")
    hub_model_id: str | None = flag(None, "accepted: the repo name shown in the upload hint", metavar="ID")


@dataclass
class LoraOptions:
    lora_rank: int | None = flag(None, "train LoRA adapters of this rank instead of the full UNet (not given: full "
                                 "fine-tuning; train_dreambooth_lora.py's default is 4, so add --rank 4 to its "
                                 "command lines that have none)", aliases=("--rank",), type=int)
    lora_alpha: float | None = flag(None, "LoRA scale numerator: updates are scaled by alpha / rank (not given: = "
                                    "rank, scale 1)", type=float)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch, in [0, 1)", type=float)
    lora_conv: bool = flag(False, "also adapt the 3x3 resnet convolutions (kohya's conv_dim)")
    lora_conv_rank: int | None = flag(None, "rank of the conv adapters (not given: --lora_rank)", type=int)


@dataclass
class EmbeddingOptions:
    train_text_embedding: bool = flag(
        False, "pivotal tuning: [V] becomes new token(s) whose embeddings train with the UNet for the first "
        "--text_embedding_frac of the steps, then freeze; learned_embeds.safetensors is written beside the model")
    text_embedding_frac: float = flag(0.5, "fraction of the steps that train the new embeddings", type=float)
    text_embedding_lr: float | None = flag(None, "learning rate of the new embeddings (not given: --learning_rate); "
                                           "Textual Inversion uses ~5e-3", type=float, metavar="LR")
    placeholder_token: str | None = flag(None, "the new token of --train_text_embedding (not given: <identifier>, "
                                         "e.g. <sks>)", metavar="TOKEN")
    initializer_token: str | None = flag(None, "one-token word whose embedding starts the new rows (not given: the "
                                         "identifier)", metavar="WORD")
    num_vectors: int = flag(1, "embedding vectors (tokens) of --train_text_embedding", type=int)


@dataclass
class EmaOptions:
    use_ema: bool = flag(False, "keep an exponential moving average of the trained weights and export it as the model "
                         "(diffusers' --use_ema)")
    ema_decay: float = flag(0.9999, "EMA decay; warmed up as diffusers' EMAModel: min(decay, (1 + n) / (10 + n)) at "
                            "update n", type=float)
    ema_device: str | None = flag(None, "where the average lives: cuda (one fused update per step) or cpu (no GPU "
                                  "memory; diffusers' --offload_ema); not given: the training device",
                                  choices=("cuda", "cpu"))
    ema_dtype: str = flag("fp32", "dtype of the average: fp32, or bf16 (half the memory)", choices=("fp32", "bf16"))
    save_raw_weights: bool = flag(False, "with --use_ema, also write the trained weights themselves to "
                                  "output_dir/raw (the model is the average)")


@dataclass
class DistributedOptions:
    device: str | None = flag(None, "cuda or cpu (not given: cuda if available; under torchrun each rank takes "
                              "cuda:LOCAL_RANK)", metavar="cuda|cpu")
    ddp_timeout: int = flag(1800, "torchrun: seconds a rank waits for the others (a rank that died or hangs ends the "
                            "run with an error after this; rank 0's export must fit in it)", type=int, metavar="S")
    shard: bool = flag(False, "torchrun: split the optimizer state and the gradients over the ranks (ZeRO stage 2: "
                       "each rank updates its share of the parameters; the weights stay whole on every rank)")
    local_rank: int = flag(-1, "accepted: under torchrun each rank's device comes from LOCAL_RANK (data parallel, see "
                           "--ddp_timeout)", type=int)


@dataclass
class TrainOptions:
    """Everything a training run is told, by concern (`opts.optim.learning_rate`, `opts.lora.lora_rank`, ...)."""

    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    prior: PriorOptions = field(default_factory=PriorOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)
    optim: OptimizerOptions = field(default_factory=OptimizerOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    checkpoints: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LoggingOptions = field(default_factory=LoggingOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    ema: EmaOptions = field(default_factory=EmaOptions)
    distributed: DistributedOptions = field(default_factory=DistributedOptions)
    method: str = "dreambooth"  # or "textual_inversion" (dbtrain textual-inversion: only new token rows train)
    config: str | None = flag(None, "TOML file with any of these options, same keys without the dashes (flags given "
                              "here override it)", metavar="TOML")

    CONCERNS: ClassVar[tuple[str, ...]] = ("model", "data", "prior", "training", "optim", "memory", "checkpoints",
                                           "logging", "lora", "embedding", "ema",
                                           "distributed")

    @property
    def trains_unet(self) -> bool:
        """Whether the UNet (or LoRA adapters on it) trains; Textual Inversion trains only new token rows."""
        return self.method != "textual_inversion"

    @property
    def uses_lora(self) -> bool:
        return self.lora.lora_rank is not None

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """Every flag's field, by flag name (dest), across the concerns."""
        out = spec.flag_fields(cls)
        for name in cls.CONCERNS:
            out.update(spec.flag_fields(cls.__dataclass_fields__[name].default_factory))
        return out

    @classmethod
    def from_flags(cls, values: dict, **fixed) -> "TrainOptions":
        """From parsed flags (dest -> value); flags a command lacks keep their defaults."""
        kinds = {name: cls.__dataclass_fields__[name].default_factory for name in cls.CONCERNS}
        top = {k: v for k, v in values.items() if k == "config"}
        return cls(**{name: spec.pick(kind, values) for name, kind in kinds.items()}, **top, **fixed)

    def to_dict(self) -> dict:
        """Flat {flag name: value} (what checkpoints and the run's marker record)."""
        out = {"method": self.method, "config": self.config}
        for name in self.CONCERNS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out


# `dbtrain train --help`: the groups and the order of their flags
TRAIN_LAYOUT = (
    ("model and data", ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "caption_extension",
                        "output_dir", "resolution", "center_crop", "seed", "revision", "variant", "tokenizer_name",
                        "image_interpolation_mode", "pretrained_vae_model_name_or_path")),
    ("prior preservation", ("with_prior_preservation", "class_data_dir", "class_prompt", "num_class_images",
                            "prior_loss_weight", "sample_batch_size", "prior_generation_precision")),
    ("training", ("train_text_encoder", "train_batch_size", "max_train_steps", "num_train_epochs",
                  "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
                  "lr_power", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                  "max_grad_norm", "snr_gamma", "offset_noise", "tokenizer_max_length",
                  "text_encoder_use_attention_mask", "class_labels_conditioning")),
    ("masks, buckets, captions, concepts (kohya's and diffusers' names)", (
        "masked_loss", "mask_dir", "mask_min", "mask_normalization", "aspect_ratio_buckets", "enable_bucket",
        "bucket_reso_steps", "caption_dropout", "shuffle_caption", "keep_tokens", "concepts")),
    ("loss and EMA", ("loss_type", "huber_c", "huber_schedule", "use_ema", "ema_decay", "ema_device", "ema_dtype",
                      "save_raw_weights")),
    ("memory and speed", ("gradient_checkpointing", "mixed_precision", "allow_tf32")),
    ("checkpoints and logging", ("checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
                                 "validation_prompt", "validation_steps", "num_validation_images",
                                 "validation_scheduler", "validation_epochs", "validation_images", "logging_dir",
                                 "report_to", "skip_save_text_encoder")),
    ("LoRA (train_dreambooth_lora.py's and kohya's names)", ("lora_rank", "lora_alpha", "lora_dropout", "lora_conv",
                                                             "lora_conv_rank", "save_single_file",
                                                             "single_file_half")),
    ("diffusers' flags that dbtrain does its own way (each prints a note)", (
        "use_8bit_adam", "enable_xformers_memory_efficient_attention", "set_grads_to_none",
        "pre_compute_text_embeddings", "dataloader_num_workers", "local_rank", "push_to_hub", "hub_token",
        "hub_model_id")),
    ("ours (dbtrain's own, not in diffusers' train_dreambooth.py)", (
        "config", "identifier", "random_flip", "image_fit", "train_text_embedding", "text_embedding_frac",
        "text_embedding_lr",
        "placeholder_token", "initializer_token", "num_vectors", "class_inference_steps", "optimizer",
        "weights_dtype", "step_in_backward", "kernels", "log_every", "device", "ddp_timeout", "shard",
        "prompt_without_identifier", "card_gb", "estimate_only", "diffusers_defaults")),
)
# the fields only `dbtrain textual-inversion` has as flags (textual_inversion.py's; trainer.options.textual_inversion)
TI_ONLY = ("learnable_property", "repeats", "save_steps", "save_as_full_pipeline", "no_safe_serialization")


def build_parser(prog: str = "dbtrain train"):
    p = spec.parser(prog, "DreamBooth fine-tuning on our kernels. The flags are those of diffusers' "
                          "examples/dreambooth/train_dreambooth.py, plus dbtrain's own (last group).")
    return spec.build(p, TRAIN_LAYOUT, TrainOptions.fields())


def parse(argv: list[str]) -> TrainOptions:
    """`dbtrain train`'s flags (and --config file) as checked options, diffusers' flags mapped (with notes)."""
    from trainer.options import checks, concepts, diffusers_flags

    p = build_parser()
    spec.config_file_defaults(p, argv)
    opts = TrainOptions.from_flags(vars(p.parse_args(argv)))
    defaults_note = diffusers_flags.their_defaults(opts, "train", diffusers_flags.given_flags(p, argv))
    checks.check(opts)
    if opts.data.concepts:  # the file, and each of its concepts as a run of its own (it reuses checks.check)
        concepts.check(opts)
    if defaults_note:
        diffusers_flags.say(defaults_note)
    diffusers_flags.apply(opts)
    return opts
