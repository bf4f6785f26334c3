"""SDXL: the tiny SDXL folder, folder checks, the two-encoder prompt, time ids and crops, loading,
and the single-file round trip through diffusers' own from_single_file (all on CPU, no downloads)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from cli_helpers import one_line_error, run_cli
from trainer.families import sdxl
from trainer.errors import UserError
from trainer.core.images import ImageSet, crop_geometry, resized_size, to_tensor
from trainer.families import family_of
from trainer.formats import single_file as sf
from trainer.formats import single_file_sdxl as sx
from trainer.world.tiny_sdxl import build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base = build_tiny_sdxl(root / "base")
    refiner = build_tiny_sdxl(root / "refiner", refiner=True)
    no_te2 = root / "no_te2"
    shutil.copytree(base, no_te2, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    return {"root": root, "base": base, "refiner": refiner, "no_te2": no_te2}


@pytest.fixture(scope="module")
def comps(folders):
    return sdxl.SDXL.load_components(folders["base"])


def _pipe(folder, c=None):
    from diffusers import StableDiffusionXLPipeline

    kw = {} if c is None else dict(unet=c.unet, vae=c.vae, text_encoder=c.text_encoder,
                                   text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer, tokenizer_2=c.tokenizer_2)
    return StableDiffusionXLPipeline.from_pretrained(folder, **kw)


def test_tiny_folder_is_consistent_and_samples(folders, comps):
    u = comps.unet.config
    t1, t2 = comps.text_encoder.config, comps.text_encoder_2.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == t1.hidden_size + t2.hidden_size
    assert u.projection_class_embeddings_input_dim == t2.projection_dim + 6 * u.addition_time_embed_dim
    assert comps.vae.config.force_upcast
    assert type(comps.noise_scheduler).__name__ == "DDPMScheduler"  # the folder ships Euler, as SDXL's does
    size = sum(f.stat().st_size for f in folders["base"].rglob("*") if f.is_file())
    assert size < 8 * 2**20
    pipe = _pipe(folders["base"], comps)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    im = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (32, 32)


def test_is_sdxl_and_bad_folders(folders, tmp_path):
    assert sdxl.is_sdxl(folders["base"]) and sdxl.is_sdxl(folders["refiner"])
    sd1 = tmp_path / "sd1"
    sd1.mkdir()
    (sd1 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert not sdxl.is_sdxl(sd1) and not sdxl.is_sdxl(tmp_path / "nope")
    assert sdxl.check_sdxl_folder(folders["base"]) == folders["base"]
    for name, part in (("refiner", "is an SDXL refiner"), ("no_te2", "without text_encoder_2, tokenizer_2")):
        with pytest.raises(UserError, match=part) as e:
            sdxl.check_sdxl_folder(folders[name])
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a folder"):
        sdxl.check_sdxl_folder(tmp_path / "nope")


def test_checks_are_torch_free(folders):
    code = ("import sys; from trainer.families import sdxl; from trainer.commands import export as export_cli; "
            f"sdxl.check_sdxl_folder({str(folders['base'])!r}); "
            f"export_cli.parse(['--model', {str(folders['base'])!r}, '--single_file', 'x.safetensors']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_encode_prompt_matches_diffusers(folders, comps):
    pipe = _pipe(folders["base"], comps)
    prompts = ["a photo of sks dog", "a red cat on the beach in the snow"]
    with torch.no_grad():
        embeds, pooled = sdxl.encode_prompt_sdxl(comps.tokenizers, comps.text_encoders, prompts, "cpu")
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
    assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)
    # the UNet call the loop makes, with per-image time ids
    ids = torch.stack([sdxl.add_time_ids((40, 50), (0, 5), (32, 32)), sdxl.add_time_ids((32, 32), (0, 0), (32, 32))])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = comps.unet(x, torch.tensor([10, 500]), embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        other = comps.unet(x, torch.tensor([10, 500]), embeds,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.flip(0)}).sample
    assert out.shape == x.shape and not torch.equal(out, other)  # the time ids condition the UNet


def test_add_time_ids():
    ids = sdxl.add_time_ids((1200, 1600), (12, 0), (1024, 1024), torch.float64, "cpu")
    assert ids.tolist() == [1200, 1600, 12, 0, 1024, 1024] and ids.dtype == torch.float64
    with pytest.raises(ValueError, match="pairs"):
        sdxl.add_time_ids((1200,), (0, 0), (1024, 1024))


def _pixels(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


# phone photos both ways, HD, a scan with odd sides, a near-square, a square, one smaller than the resolution
SIZES = [(4032, 3024), (3024, 4032), (1920, 1080), (1275, 1651), (1001, 1000), (1024, 1024), (700, 900)]


@pytest.mark.parametrize("width,height", SIZES)
def test_crop_geometry_matches_to_tensor(width, height):
    res = 1024
    g = torch.Generator().manual_seed(width + height)
    img = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    nw, nh = resized_size(width, height, res)
    resized = img.resize((nw, nh), Image.BILINEAR)
    for crop_xy in (None, (0.0, 1.0), (float(torch.rand((), generator=g)), float(torch.rand((), generator=g)))):
        for flip in (False, True):
            orig, (top, left) = crop_geometry(width, height, res, crop_xy, flip=flip)
            assert orig == (height, width)
            source = resized.transpose(Image.FLIP_LEFT_RIGHT) if flip else resized
            want = _pixels(source.crop((left, top, left + res, top + res)))
            got = to_tensor(img, res, crop_xy=crop_xy, flip=flip)
            assert torch.equal(got, want), (crop_xy, flip)


def test_view_geometry_of_an_image_set(tmp_path):
    Image.new("RGB", (48, 40), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "square.png")
    files = sorted(tmp_path.glob("*.png"))
    images = ImageSet(files, 32, center_crop=False, random_flip=False)
    assert images.geometry(0, None) == ((40, 40), (0, 0))  # square.png: cached center view
    assert images.geometry(1, (1.0, 0.0)) == ((40, 48), (0, 6))  # 48x40 -> 38x32, right edge
    centered = ImageSet(files, 32, center_crop=True, random_flip=False)
    assert centered.geometry(1, (1.0, 0.0)) == ((40, 48), (0, 3))


def test_draw_view_is_image_set_tensor_with_geometry(tmp_path):
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(48, 40), (40, 40), (30, 52)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    files = sorted(tmp_path.glob("*.png"))
    for center_crop, flip in ((False, True), (False, False), (True, True)):
        images = ImageSet(files, 32, center_crop=center_crop, random_flip=flip)
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for step in range(6):
            i = step % len(files)
            want, want_flip = images.tensor(i, g1)
            got, got_flip, (orig, crop) = images.view(i, g2)
            assert torch.equal(got, want) and got_flip == want_flip
            assert orig == images.images[i].size[::-1]
            nw, nh = resized_size(*images.images[i].size, 32)
            assert 0 <= crop[0] <= nh - 32 and 0 <= crop[1] <= nw - 32
        assert torch.equal(g1.get_state(), g2.get_state())
    ids = sdxl.time_ids_batch([((40, 48), (0, 6)), ((40, 40), (0, 0))], 32)
    assert ids.tolist() == [[40, 48, 0, 6, 32, 32], [40, 40, 0, 0, 32, 32]]


def test_vae_dtype_and_own_vae(folders, comps, tmp_path):
    assert sdxl.SDXL.vae_dtype(comps.vae, torch.float16) == torch.float32
    assert sdxl.SDXL.vae_dtype(comps.vae, torch.bfloat16) == torch.bfloat16
    assert sdxl.SDXL.vae_dtype(comps.vae, torch.float32) == torch.float32
    from diffusers import AutoencoderKL

    safe = AutoencoderKL.from_config({**comps.vae.config, "force_upcast": False})
    safe.save_pretrained(tmp_path / "fp16_vae")
    c = sdxl.SDXL.load_components(folders["base"], vae=tmp_path / "fp16_vae")
    assert sdxl.SDXL.vae_dtype(c.vae, torch.float16) == torch.float16
    with pytest.raises(UserError, match="not a diffusers AutoencoderKL folder"):
        sdxl.SDXL.load_components(folders["base"], vae=tmp_path)


def _changed(comps):
    """The four models with every weight moved, so the file's weights are told apart from the folder's."""
    import copy

    models = [copy.deepcopy(m) for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return models


def _outputs(unet, vae, te, te2, tok, tok2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        embeds, pooled = sdxl.encode_prompt_sdxl([tok, tok2], [te, te2], ["a sks dog", "a red toy"], "cpu")
        ids = torch.stack([sdxl.add_time_ids((48, 32), (0, 3), (32, 32))] * 2)
        return {"embeds": embeds, "pooled": pooled,
                "unet": unet(x, torch.tensor([10, 700]), embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample,
                "vae_encode": vae.encode(img).latent_dist.mean, "vae_decode": vae.decode(x[:1]).sample}


def test_single_file_round_trip_with_diffusers_loader(folders, comps):
    from diffusers import StableDiffusionXLPipeline

    models = _changed(comps)
    out = sx.save_single_file_sdxl(folders["base"], folders["root"] / "trained.safetensors", components=models,
                                   metadata={"dbtrain.note": "x"})
    sd = load_file(str(out))
    assert sd[sx.CLIP_G + "text_projection"].shape == (48, 40)  # [width, projection]: x @ P
    assert torch.equal(sd[sx.CLIP_G + "text_projection"], models[3].text_projection.weight.t())
    assert torch.equal(sd["model.diffusion_model.label_emb.0.0.weight"], models[0].add_embedding.linear_1.weight)
    assert not any(k.startswith("cond_stage_model.") for k in sd) and sf.V_PRED_KEY not in sd
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base" and meta["dbtrain.note"] == "x"

    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folders["base"]), local_files_only=True)
    theirs = (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    back = sx.diffusers_state_dicts_sdxl(sd, comps.unet.config, comps.vae.config)
    for name, ours, loaded in zip(("unet", "vae", "text_encoder", "text_encoder_2"), models, theirs):
        a, b = ours.state_dict(), loaded.state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
        plain = {k.removeprefix("text_model."): v for k, v in a.items() if not k.endswith("position_ids")}
        assert set(plain) == set(back[name]) and all(torch.equal(plain[k], back[name][k]) for k in plain), name
    want = _outputs(*models, comps.tokenizer, comps.tokenizer_2)
    got = _outputs(*theirs, pipe.tokenizer, pipe.tokenizer_2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    base = _outputs(comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2, comps.tokenizer,
                    comps.tokenizer_2)
    assert not torch.equal(base["unet"], got["unet"])  # the file's weights, not the folder's


def test_export_cli(folders, capsys, tmp_path):
    out = tmp_path / "xl.safetensors"
    code, stdout, err = run_cli(["export", "--model", str(folders["base"]), "--single_file", str(out), "--half"],
                                capsys)
    assert code == 0, err
    assert "wrote" in stdout
    sd = load_file(str(out))
    unet = sdxl.SDXL.load_models(folders["base"])[0]
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert torch.equal(sd["model.diffusion_model.input_blocks.0.0.weight"], unet.conv_in.weight.half())
    # v-prediction: ComfyUI's marker and the header
    vfolder = tmp_path / "v"
    shutil.copytree(folders["base"], vfolder)
    cfg_path = vfolder / "scheduler/scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "prediction_type": "v_prediction"}))
    vout = family_of(vfolder).save_single_file(vfolder, tmp_path / "v.safetensors")  # the SDXL family's
    with safe_open(str(vout), "pt") as f:
        assert sf.V_PRED_KEY in f.keys() and f.metadata()["modelspec.prediction_type"] == "v"
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    cases = [(["--model", str(folders["refiner"]), "--single_file", str(tmp_path / "o.safetensors")],
              "is an SDXL refiner"),
             (["--model", str(folders["no_te2"]), "--single_file", str(tmp_path / "o.safetensors")],
              "without text_encoder_2"),
             (["--model", str(folders["base"]), "--lora", str(lora), "--merge", "--single_file",
               str(tmp_path / "o.safetensors")], "not a readable .safetensors")]  # SDXL merges; a junk file does not
    for argv, part in cases:
        code, _, err = run_cli(["export", *argv], capsys)
        one_line_error(code, err, part)
    assert not (tmp_path / "o.safetensors").exists()


def test_real_sdxl_layout_against_diffusers_converters():
    """SDXL 1.0's own configs (no weights, meta tensors): our names are what diffusers' converters read."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = json.loads((ROOT / "trainer/memory/arch_configs/sdxl.json").read_text())
    te = [CLIPTextConfig(**{k: v for k, v in c.items() if k != "architectures"}) for c in cfg["text_encoder"]]
    with init_empty_weights():
        models = (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                  CLIPTextModel(te[0]), CLIPTextModelWithProjection(te[1]))
    sd = sx.single_file_state_dict_sdxl(*models)
    unet, vae, t1, t2 = models
    assert set(su.convert_ldm_unet_checkpoint(dict(sd), dict(unet.config))) == set(unet.state_dict())
    assert set(su.convert_ldm_vae_checkpoint(dict(sd), dict(vae.config))) == set(vae.state_dict())
    assert {k.removeprefix("text_model.") for k in su.convert_ldm_clip_checkpoint(sd)} == set(t1.state_dict())
    assert set(su.convert_open_clip_checkpoint(t2, sd, prefix=sx.CLIP_G)) == set(t2.state_dict())
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert sd[sx.CLIP_G + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert len(sd) == 2513
