"""Full DreamBooth: the whole UNet trains (with --train_text_encoder every text encoder too); the result is
a diffusers folder of the whole pipeline (and with --save_single_file one .safetensors for A1111/ComfyUI)."""
from __future__ import annotations

import shutil
from pathlib import Path

from trainer.formats import diffusers_folder, outdir
from trainer.methods.base import Method, Trainable, train_mode_text_encoder, trained_pipeline, write_single_file


class FullModel(Method):
    name = "full"
    saved = "the trained model"

    def prepare(self, opts, comps, device, weights_dtype) -> Trainable:
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        models = {"unet": comps.unet}
        if opts.training.train_text_encoder:  # SDXL: both encoders
            for name, enc in comps.named_text_encoders.items():
                train_mode_text_encoder(opts, enc, device, weights_dtype)
                params += [p for p in enc.parameters() if p.requires_grad]
                models[name] = enc
        else:
            for enc in comps.text_encoders:
                enc.requires_grad_(False)
        return Trainable(params=params, models=models)

    def save(self, run, out: Path, step: int) -> None:
        trained = {n: m for n, m in run.trainable.models.items() if n.startswith("text_encoder")}
        export(run.opts, run.unet, trained, out)
        if run.opts.checkpoints.save_single_file:
            print(f"single file: {out / write_single_file(run.opts, out)}")


def export(opts, unet, text_encoders: dict, out: Path) -> None:
    """Write the model into `out` as a diffusers folder (the base's pipeline with the trained parts). Raises
    outdir.NoSpace (no room, failed write) or UserError (an item there that this run did not write); `out` is
    then as it was before."""
    pipe = trained_pipeline(opts, unet, text_encoders)
    if opts.checkpoints.skip_save_text_encoder:  # diffusers' flag: the folder without text_encoder/
        from trainer.families import family_of

        pipe.register_modules(**dict.fromkeys(family_of(opts.model.pretrained_model_name_or_path).text_encoder_names))
    need = diffusers_folder.model_bytes(opts.model.pretrained_model_name_or_path, pipe)
    outdir.require_space(out, need, "the trained model")
    tmp = diffusers_folder.staging(out)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise outdir.failed_write(out, "the trained model", e, need) from e
    diffusers_folder.install(out, tmp)
