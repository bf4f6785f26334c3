"""Single-file export at the real SD1.5 / SD2.1 sizes, without downloading them.

    python -m bench export OUT_DIR [--arch sd15 sd21]

Builds each architecture from trainer/memory/arch_configs/<arch>.json (the public folders' configs)
with random float16 weights, runs `dbtrain export --model DIR --single_file F --half`, and
loads F back with diffusers' StableDiffusionPipeline.from_single_file(F, config=DIR,
local_files_only=True): prints the export time, the file size, the tensor count per
model, and whether every tensor came back identical. One JSON line per architecture.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARCH_DIR = Path(__file__).resolve().parents[1] / "trainer" / "memory" / "arch_configs"


def build(arch: str, folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.world.tiny_sd import write_tokenizer_files

    cfg = json.loads((ARCH_DIR / f"{arch}.json").read_text())
    torch.manual_seed(0)
    te_cfg = cfg["text_encoder"][0] if isinstance(cfg["text_encoder"], list) else cfg["text_encoder"]
    te_cfg = {k: v for k, v in te_cfg.items() if k not in ("architectures", "model_type")}
    unet = UNet2DConditionModel.from_config(cfg["unet"]).half()
    vae = AutoencoderKL.from_config(cfg["vae"]).half()
    te = CLIPTextModel(CLIPTextConfig(**te_cfg)).half()
    tok_dir = folder.parent / f".{arch}-tokenizer"
    write_tokenizer_files(tok_dir)
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler.from_config(cfg["scheduler"]), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def measure(arch: str, out: Path) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from trainer import cli
    from trainer.families import SD
    from trainer.formats import single_file as sf

    folder = build(arch, out / arch)
    target = out / f"{arch}.safetensors"
    t0 = time.perf_counter()
    code = cli.main(["export", "--model", str(folder), "--single_file", str(target), "--half"])
    seconds = time.perf_counter() - t0
    assert code == 0, code
    from safetensors import safe_open

    with safe_open(str(target), "pt") as f:
        keys = list(f.keys())
    counts = {p: sum(k.startswith(p) for k in keys) for p in (sf.UNET, sf.VAE, "cond_stage_model.")}
    pipe = StableDiffusionPipeline.from_single_file(str(target), config=str(folder), local_files_only=True,
                                                    torch_dtype=torch.float16, safety_checker=None,
                                                    requires_safety_checker=False)
    unet, vae, te = SD.load_models(folder, dtype=torch.float16)
    same = {}
    for name, a, b in (("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("text_encoder", te, pipe.text_encoder)):
        x, y = a.state_dict(), b.state_dict()
        same[name] = set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    return {"arch": arch, "export_s": round(seconds, 1), "file_mib": round(target.stat().st_size / 2**20, 1),
            "tensors": {"unet": counts[sf.UNET], "vae": counts[sf.VAE], "text": counts["cond_stage_model."],
                        "other": len(keys) - sum(counts.values())},
            "v_pred_key": sf.V_PRED_KEY in keys, "yaml": target.with_suffix(".yaml").exists(),
            "from_single_file_identical": same, "prediction_type": pipe.scheduler.config.prediction_type}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench export", description=__doc__.split("\n")[0])
    p.add_argument("out", help="a new folder for the models and files (several GB)")
    p.add_argument("--arch", nargs="+", default=["sd15", "sd21"], choices=["sd15", "sd21"])
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=False)
    for arch in a.arch:
        print(json.dumps(measure(arch, out)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
