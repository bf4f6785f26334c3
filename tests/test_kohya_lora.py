"""kohya LoRA files: names against diffusers' convert_state_dict_to_kohya, loading with diffusers'
load_lora_weights against our merge, diffusers-format files, and LoRAs for another architecture.

The adapters are built here with peft (UNet: attention to_q/k/v/out.0 and the resnets' 3x3
conv1/conv2 as kohya's conv_dim; text encoder: q/k/v/out_proj), independent of the trainer.
"""
import json

import pytest
import torch
from safetensors import safe_open

from tests.cli_helpers import add_random_lora
from trainer.errors import UserError
from trainer.families import SD
from trainer.formats import kohya_lora as kl
from trainer.world.tiny_sd import build_tiny_sd

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_R, UNET_ALPHA, TE_R, TE_ALPHA = 4, 8, 2, 1


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny SD folder, peft adapters on its UNet and text encoder (random B), their state dicts and configs."""
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("kohya")
    folder = build_tiny_sd(root / "model")
    pipe = _pipe(folder)
    torch.manual_seed(0)
    ucfg = LoraConfig(r=UNET_R, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    tcfg = LoraConfig(r=TE_R, lora_alpha=TE_ALPHA, target_modules=TE_TARGETS, init_lora_weights="gaussian")
    add_random_lora(pipe.unet, [pipe.text_encoder], ucfg, tcfg)
    usd, tsd = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    alphas = {**{f"unet.{m}": UNET_ALPHA for m in kl.peft_pairs(usd)},
              **{f"text_encoder.{m}": TE_ALPHA for m in kl.peft_pairs(tsd)}}
    state = kl.to_kohya({"unet": usd, "text_encoder": tsd}, alphas=alphas)
    path = kl.save_kohya_lora(root / "subject.safetensors", state,
                              kl.kohya_metadata(rank=UNET_R, alpha=UNET_ALPHA, base_model="tiny", steps=10,
                                                identifier="sks", name="subject", conv_rank=UNET_R))
    return {"root": root, "folder": folder, "peft_pipe": pipe, "usd": usd, "tsd": tsd, "state": state,
            "path": path, "ucfg": ucfg, "tcfg": tcfg}


def merge_lora(folder, lora_file, scale: float = 1.0) -> dict:
    """A LoRA file merged into an SD folder's models: {unet, vae, text_encoder} (the SD family's merge)."""
    return dict(zip(("unet", "vae", "text_encoder"), SD.merge_lora(folder, lora_file, scale=scale)))


def _probe(pipe_or_modules):
    unet, te = (pipe_or_modules.unet, pipe_or_modules.text_encoder) if hasattr(pipe_or_modules, "unet") else (
        pipe_or_modules["unet"], pipe_or_modules["text_encoder"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (2, 16), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb = te(ids)[0]
        return emb, unet(x, torch.tensor([10, 700]), emb).sample


def test_names_match_diffusers_convert_state_dict_to_kohya(lora):
    from diffusers.utils import convert_state_dict_to_kohya

    usd, tsd, ours = lora["usd"], lora["tsd"], lora["state"]
    # diffusers names the text encoder's modules as transformers 4 did (text_model.), and SD1's as lora_te1_
    ref = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in usd.items()},
                                       **{f"text_encoder.text_model.{k}": v for k, v in tsd.items()}})
    ref = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in ref.items()}
    assert set(ours) == set(ref)
    for k, v in ref.items():
        if not k.endswith(".alpha"):  # diffusers writes alpha = rank; ours are the adapters' alphas
            assert torch.equal(ours[k], v), k
    # every targeted module is there, with its alpha
    n_unet = sum(1 for n, _ in lora["peft_pipe"].unet.named_modules() if n.endswith(tuple(UNET_TARGETS))
                 and hasattr(_, "lora_A"))
    names = {k.split(".")[0] for k in ours}
    assert len([n for n in names if n.startswith("lora_unet_")]) == n_unet
    assert len([n for n in names if n.startswith("lora_te_")]) == 2 * len(TE_TARGETS)  # 2 layers
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names  # conv LoRA (kohya's conv_dim)
    assert ours["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[1:] == (32, 3, 3)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj" in names
    assert float(ours["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == UNET_ALPHA
    assert float(ours["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == TE_ALPHA


def test_reverse_names(lora):
    modules = {"unet": lora["peft_pipe"].unet, "text_encoder": lora["peft_pipe"].text_encoder}
    parts, unknown = kl.from_kohya(lora["state"], modules)
    assert unknown == []
    for comp, sd in (("unet", lora["usd"]), ("text_encoder", lora["tsd"])):
        pairs = kl.peft_pairs(sd)
        assert set(parts[comp]) == set(pairs)
        for mod, p in pairs.items():
            assert torch.equal(parts[comp][mod]["down"], p["down"]) and torch.equal(parts[comp][mod]["up"], p["up"])


def test_header(lora):
    with safe_open(str(lora["path"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(UNET_R) and meta["ss_network_alpha"] == str(UNET_ALPHA)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == "tiny"
    assert meta["ss_max_train_steps"] == "10"
    assert json.loads(meta["ss_tag_frequency"]) == {"dbtrain": {"sks": 1}}
    assert json.loads(meta["ss_network_args"])["conv_dim"] == str(UNET_R)


def test_diffusers_loader_matches_our_merge(lora):
    """pipeline.load_lora_weights(our kohya file) == our merge == the peft model we started from."""
    base = _probe(_pipe(lora["folder"]))
    loaded = _pipe(lora["folder"])
    loaded.load_lora_weights(str(lora["path"]))
    want = _probe(lora["peft_pipe"])
    got_diffusers = _probe(loaded)
    got_ours = _probe(merge_lora(lora["folder"], lora["path"]))
    for w, d, o, b in zip(want, got_diffusers, got_ours, base):
        assert (w - b).abs().max() > 1e-3  # the LoRA changes the outputs
        torch.testing.assert_close(d, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5)


def test_merge_scale(lora):
    base = _probe(_pipe(lora["folder"]))[1]
    full = _probe(merge_lora(lora["folder"], lora["path"], scale=1.0))[1]
    none = _probe(merge_lora(lora["folder"], lora["path"], scale=0.0))[1]
    torch.testing.assert_close(none, base)
    assert not torch.allclose(full, base)


def test_diffusers_format_file(lora, tmp_path):
    """save_lora_weights' file (peft names, alphas in its header) converts to the same kohya dict and merges alike."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=lora["usd"], text_encoder_lora_layers=lora["tsd"],
        unet_lora_adapter_metadata=lora["ucfg"].to_dict(), text_encoder_lora_adapter_metadata=lora["tcfg"].to_dict())
    f = tmp_path / "pytorch_lora_weights.safetensors"
    sd, meta = kl.read_lora(f)
    conv = kl.diffusers_to_kohya(sd, meta)
    assert set(conv) == set(lora["state"])
    assert all(torch.equal(conv[k].float(), lora["state"][k].float()) for k in conv)
    want = _probe(lora["peft_pipe"])
    for got in (_probe(merge_lora(lora["folder"], f)), ):
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    loaded = _pipe(lora["folder"])
    loaded.load_lora_weights(str(tmp_path))
    for w, g in zip(want, _probe(loaded)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_lora_for_another_architecture(lora, tmp_path):
    from safetensors.torch import save_file

    state = dict(lora["state"])
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    state[k] = torch.zeros(UNET_R, 48)  # cross-attention width of another text encoder
    bad = tmp_path / "other.safetensors"
    save_file(state, str(bad))
    with pytest.raises(UserError, match="another architecture"):
        merge_lora(lora["folder"], bad)
    extra = dict(lora["state"])
    extra["lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    extra["lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    bad2 = tmp_path / "deeper.safetensors"
    save_file(extra, str(bad2))
    with pytest.raises(UserError, match="does not have"):
        merge_lora(lora["folder"], bad2)


def test_sdxl_text_encoder_names_match_diffusers():
    """SDXL's two text encoders are lora_te1_ / lora_te2_, as diffusers (and kohya) name them."""
    from diffusers.utils import convert_state_dict_to_kohya

    a, b = torch.randn(2, 8), torch.randn(8, 2)
    peft = {"encoder.layers.0.self_attn.q_proj.lora_A.weight": a, "encoder.layers.0.self_attn.q_proj.lora_B.weight": b}
    ours = kl.to_kohya({"unet": {"mid_block.attentions.0.proj_in.lora_A.weight": a,
                                 "mid_block.attentions.0.proj_in.lora_B.weight": b},
                        "text_encoder": peft, "text_encoder_2": peft})
    ref = convert_state_dict_to_kohya({
        "unet.mid_block.attentions.0.proj_in.lora_A.weight": a, "unet.mid_block.attentions.0.proj_in.lora_B.weight": b,
        **{f"text_encoder.text_model.{k}": v for k, v in peft.items()},
        **{f"text_encoder_2.text_model.{k}": v for k, v in peft.items()}})
    assert set(ours) == set(ref)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in ours
