"""Single-file checkpoints (A1111/ComfyUI layout) <-> diffusers folders, checked with diffusers' own loader.

Tiny SD1-style (CLIP, epsilon) and SD2-style (OpenCLIP names, linear proj_in, v-prediction)
models; the round trip goes through StableDiffusionPipeline.from_single_file(OUT, config=DIR,
local_files_only=True), and our reverse table is compared with diffusers' converters.
"""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.errors import UserError
from trainer.families import SD
from trainer.formats import single_file as sf
from trainer.world.tiny_sd import build_tiny_sd

KINDS = {"sd1": {}, "sd2v": {"sd2_style": True, "prediction_type": "v_prediction"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for kind, kw in KINDS.items():
        d = build_tiny_sd(root / kind, **kw)
        f = SD.save_single_file(d, root / f"{kind}.safetensors")
        out[kind] = (d, f)
    return out


def _load_single(path, config):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def _outputs(unet, vae, te):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 16), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        emb = te(ids)[0]
        return {"text_encoder": emb, "unet": unet(x, torch.tensor([10, 700]), emb).sample,
                "vae_encode": vae.encode(img).latent_dist.mean, "vae_decode": vae.decode(x[:1]).sample}


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_with_diffusers_loader(models, kind):
    folder, path = models[kind]
    pipe = _load_single(path, folder)
    unet, vae, te = SD.load_models(folder)
    for name, ours, theirs in (("unet", unet, pipe.unet), ("vae", vae, pipe.vae), ("te", te, pipe.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    want, got = _outputs(unet, vae, te), _outputs(pipe.unet, pipe.vae, pipe.text_encoder)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert pipe.scheduler.config.prediction_type == sf.prediction_type(folder)


def test_original_layout_sd1(models):
    _, path = models["sd1"]
    sd = load_file(str(path))
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 4
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd  # the first downsampler
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd  # upsampler after a resnet-only block
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "model.diffusion_model.output_blocks.2.0.skip_connection.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, not linear
    assert "first_stage_model.decoder.up.2.upsample.conv.weight" in sd  # decoder numbered the other way
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in sd
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd
    assert "v_pred" not in sd
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "epsilon"


def test_original_layout_sd2_v(models):
    folder, path = models["sd2v"]
    sd = load_file(str(path))
    w = sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert w.shape == (96, 32)  # q, k, v fused
    assert "cond_stage_model.model.positional_embedding" in sd
    assert "cond_stage_model.model.ln_final.weight" in sd
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # SD2's linear proj_in
    assert "v_pred" in sd  # the marker ComfyUI reads for SDXL-class files
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v"
    import yaml  # A1111 reads the original config from <name>.yaml beside the checkpoint

    cfg = yaml.safe_load(path.with_suffix(".yaml").read_text())["model"]["params"]
    assert cfg["parameterization"] == "v"
    unet = cfg["unet_config"]["params"]
    assert (unet["model_channels"], unet["channel_mult"], unet["num_res_blocks"]) == (32, [1, 2], 1)
    assert unet["attention_resolutions"] == [1] and unet["use_linear_in_transformer"] is True
    assert cfg["cond_stage_config"]["params"]["layer"] == "penultimate"
    assert not models["sd1"][1].with_suffix(".yaml").exists()  # epsilon: nothing to say


def test_v_prediction_config_never_overwritten(models, tmp_path):
    folder, _ = models["sd2v"]
    (tmp_path / "v.yaml").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        SD.save_single_file(folder, tmp_path / "v.safetensors")
    assert (tmp_path / "v.yaml").read_text() == "mine" and not (tmp_path / "v.safetensors").exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_reverse_table_matches_diffusers_converters(models, kind):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    folder, path = models[kind]
    sd = load_file(str(path))
    ucfg = UNet2DConditionModel.load_config(folder / "unet")
    vcfg = AutoencoderKL.load_config(folder / "vae")
    ours = sf.diffusers_state_dicts(sd, ucfg, vcfg)
    theirs = {"unet": convert_ldm_unet_checkpoint(sd, ucfg), "vae": convert_ldm_vae_checkpoint(sd, vcfg)}
    if kind == "sd1":
        te = convert_ldm_clip_checkpoint(sd)
    else:
        te = convert_open_clip_checkpoint(SD.load_models(folder)[2], sd)
    theirs["text_encoder"] = {k.removeprefix("text_model."): v for k, v in te.items()}
    for part in ours:
        assert set(ours[part]) == set(theirs[part]), part
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in ours[part]), part
    # and forward(reverse(file)) is the file again
    unet, vae, te_model = SD.load_models(folder)
    again = sf.single_file_state_dict((ours["unet"], ucfg), (ours["vae"], vcfg),
                                      (ours["text_encoder"], te_model.config.to_dict()),
                                      v_prediction="v_pred" in sd)
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_half_precision(models, tmp_path):
    folder, _ = models["sd1"]
    out = SD.save_single_file(folder, tmp_path / "half.safetensors", half=True)
    sd = load_file(str(out))
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    pipe = _load_single(out, folder)
    unet = SD.load_models(folder)[0]
    ref = unet.state_dict()
    got = pipe.unet.state_dict()
    assert all(torch.equal(got[k].float(), ref[k].half().float()) for k in ref)


def test_never_overwrites(models, tmp_path):
    folder, _ = models["sd1"]
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"a file the user made")
    with pytest.raises(UserError, match="already exists"):
        SD.save_single_file(folder, mine)
    assert mine.read_bytes() == b"a file the user made"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]  # no temporary left


def test_sd2_full_openclip_keys_for_strict_loaders():
    """A real SD2 text encoder (23 of OpenCLIP-H's 24 blocks) gets the unused block 23, text_projection
    and logit_scale; diffusers' converter ignores them and reads back the 23 blocks."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    w = 8
    te = {"embeddings.token_embedding.weight": torch.randn(10, w),
          "embeddings.position_embedding.weight": torch.randn(4, w),
          "final_layer_norm.weight": torch.ones(w), "final_layer_norm.bias": torch.zeros(w)}
    for i in range(23):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            te[f"encoder.layers.{i}.{n}.weight"] = torch.randn(w, w)
            te[f"encoder.layers.{i}.{n}.bias"] = torch.randn(w)
        for n in ("layer_norm1", "layer_norm2"):
            te[f"encoder.layers.{i}.{n}.weight"] = torch.randn(w)
            te[f"encoder.layers.{i}.{n}.bias"] = torch.randn(w)
        te[f"encoder.layers.{i}.mlp.fc1.weight"] = torch.randn(2 * w, w)
        te[f"encoder.layers.{i}.mlp.fc1.bias"] = torch.randn(2 * w)
        te[f"encoder.layers.{i}.mlp.fc2.weight"] = torch.randn(w, 2 * w)
        te[f"encoder.layers.{i}.mlp.fc2.bias"] = torch.randn(w)
    sd = sf.text_to_original(te, "openclip")
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in sd
    assert sd["cond_stage_model.model.text_projection"].shape == (w, w)
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(None, sd).items()}
    ours = sf.text_from_original(sd, "openclip")
    for got in (theirs, ours):
        assert set(got) == set(te) and all(torch.equal(got[k], te[k]) for k in te)


def test_not_an_sd_folder(tmp_path):
    with pytest.raises(UserError, match="not a diffusers Stable Diffusion folder"):
        sf.check_source_folder(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        sf.check_source_folder(tmp_path / "missing")
