"""`dbtrain train` on a tiny SDXL folder: full and LoRA DreamBooth with prior preservation (class images drawn by
StableDiffusionXLPipeline), per-image size/crop time ids, exports diffusers loads, kill-safe resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from cli_helpers import one_line_error, run_cli, train_until_interrupt, write_tiny_judge
from test_trainer import make_images
from trainer import cli
from trainer.options import train as config
from trainer.core import loop
from trainer.families import sdxl
from trainer.world.tiny_sdxl import build_tiny_sdxl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a shared CPU torch's worker threads wait on each
    other: one step took 16 s instead of 0.15 s here with 2 threads and 2 other busy processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    """Two instance images of different sizes: one square (a cached view), one portrait (random crops)."""
    folder = make_images(tmp_path_factory.mktemp("inst") / "inst", n=1, size=(50, 50))
    Image.new("RGB", (40, 64), (30, 90, 200)).save(folder / "tall.png")
    return folder


@pytest.fixture(scope="module")
def own_vae(model, tmp_path_factory):
    """An "fp16-safe" VAE folder (force_upcast false; the tiny VAE's weights scaled, so it is told apart)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", force_upcast=False)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.01)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder, vae.state_dict()


def train_args(model, inst, out, *extra, steps=3):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--log_every", "1", "--seed", "3",
            "--device", "cpu", "--kernels", "off", "--optimizer", "adamw", *extra]


def prior_args(cls_dir):
    return ["--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(cls_dir),
            "--num_class_images", "2", "--class_inference_steps", "2", "--sample_batch_size", "2"]


def _probe(pipe):
    """The UNet's output for a fixed prompt through both text encoders (the SDXL conditioning path)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        emb, pooled = sdxl.encode_prompt_sdxl([pipe.tokenizer, pipe.tokenizer_2],
                                              [pipe.text_encoder, pipe.text_encoder_2], ["a photo of sks toy"])
        ids = sdxl.time_ids_batch([((64, 40), (0, 4))], 32)
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=emb,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


@pytest.fixture(scope="module")
def full_run(model, inst, tmp_path_factory):
    """Full DreamBooth (UNet + both text encoders) with prior preservation, class images generated, and the
    single file; the time ids of every batch recorded."""
    tmp = tmp_path_factory.mktemp("full")
    seen = []
    real = sdxl.added_cond

    def record(pooled, views, resolution, device=None):
        out = real(pooled, views, resolution, device)
        seen.append((list(views), out["time_ids"].clone(), tuple(pooled.shape)))
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(sdxl, "added_cond", record)
    try:
        assert cli.main(train_args(model, inst, tmp / "out", "--train_text_encoder", "--save_single_file",
                                   "--validation_prompt", "a photo of [V] toy", "--validation_steps", "3",
                                   "--num_validation_images", "1", *prior_args(tmp / "cls"))) == 0
    finally:
        mp.undo()
    return tmp, seen


def test_full_run_exports_an_sdxl_folder_that_samples(model, full_run):
    from diffusers import StableDiffusionXLPipeline

    tmp, seen = full_run
    out = tmp / "out"
    assert sorted(p.name for p in (tmp / "cls").glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(model)
    for name in ("unet", "text_encoder", "text_encoder_2"):  # all three trained
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a), name
    torch.testing.assert_close(base.vae.state_dict(), pipe.vae.state_dict())  # the VAE is not trained
    images = pipe("a photo of sks toy", num_inference_steps=2, height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (32, 32)
    assert Image.open(out / "validation" / "step-000003.png").size == (32, 32)  # the grid, drawn by the SDXL pipeline
    assert len(seen) == 3 and all(shape == (2, 40) for *_, shape in seen)  # instance + class row, pooled 40


def test_time_ids_follow_each_images_size_and_crop(full_run, model, inst):
    """Rows of the trained batches: the square image's cached centre view, the portrait's random crops
    (both sizes seen), the generated 32x32 class images; the ids are exactly add_time_ids of those views."""
    _, seen = full_run
    for views, ids, _ in seen:
        assert ids.shape == (2, 6) and ids.dtype == torch.float32
        assert torch.equal(ids, sdxl.time_ids_batch(views, 32))
        assert ids[1].tolist() == [32, 32, 0, 0, 32, 32]  # class image: generated at the resolution
    # every (step, micro) draw, replayed on the loop's Batches: two images of different sizes -> different ids
    cfg = config.parse(train_args(model, inst, "unused")[1:])
    from trainer.core.batches import step_seed
    from trainer.core.images import ImageSet, list_images
    from trainer.families import load_components

    comps = load_components(model)
    images = ImageSet(list_images(inst, "instance image"), 32, center_crop=False, random_flip=True)
    batches = loop.Batches(cfg, sdxl.SDXL, comps, images, None, {"inst": "a photo of sks toy"}, torch.device("cpu"),
                           torch.float16)  # (what a GPU run in fp16 asks for)
    assert batches.vae_dtype == torch.float32  # SDXL's VAE (force_upcast) is kept in float32
    by_image = {}
    for step in range(12):
        batch = batches.make(step, 0)
        gen = torch.Generator().manual_seed(step_seed(cfg.training.seed, step, 0))
        i = int(torch.randint(0, len(images), (), generator=gen))
        _, flip, view = images.view(i, gen)
        assert batch[3]["time_ids"][0].tolist() == sdxl.add_time_ids(*view, (32, 32)).tolist()
        by_image.setdefault(images.files[i].name, set()).add(tuple(batch[3]["time_ids"][0].tolist()))
    assert by_image["img0.png"] == {(50.0, 50.0, 0.0, 0.0, 32.0, 32.0)}  # square: resized, nothing cropped
    tall = by_image["tall.png"]
    assert all(t[:2] == (64.0, 40.0) and t[3] == 0 for t in tall) and len(tall) > 1  # crops at varying tops


def test_single_file_of_a_trained_run(full_run):
    from diffusers import StableDiffusionXLPipeline

    tmp, _ = full_run
    out = tmp / "out"
    files = [f for f in out.glob("*.safetensors")]
    assert len(files) == 1
    loaded = StableDiffusionXLPipeline.from_single_file(str(files[0]), config=str(out), local_files_only=True)
    folder = StableDiffusionXLPipeline.from_pretrained(out)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(folder, name).state_dict(), getattr(loaded, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_lora_with_prior_preservation(model, inst, full_run, own_vae, tmp_path, capsys):
    """LoRA on the UNet and both text encoders: diffusers' SDXL loader and our merge (sample / eval / the
    merged single file, which carries the run's own VAE) give the same model; the kohya file has lora_te1_ /
    lora_te2_ names."""
    from diffusers import StableDiffusionXLPipeline

    from trainer.methods.outputs import load_pipeline

    tmp, _ = full_run
    out = tmp_path / "lora"
    assert cli.main(train_args(model, inst, out, "--lora_rank", "4", "--train_text_encoder", "--save_single_file",
                               "--pretrained_vae_model_name_or_path", str(own_vae[0]),
                               *prior_args(tmp / "cls"))) == 0  # (class images already there)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    base = _probe(pipe)
    pipe.load_lora_weights(out)  # diffusers' own loader
    theirs = _probe(pipe)
    assert not torch.allclose(base, theirs, atol=1e-5)
    ours = _probe(load_pipeline(out, "cpu"))  # a LoRA output folder: base + its LoRA, merged by us
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}
    for part in ("unet", "text_encoder", "text_encoder_2"):  # B starts at zero: every part's adapters moved
        assert any(v.abs().max() > 0 for k, v in sd.items() if k.startswith(part + ".") and "lora_B" in k), part
    kohya = out / "lora.safetensors"
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    merged = StableDiffusionXLPipeline.from_single_file(str(out / "lora-merged.safetensors"), config=str(model),
                                                        local_files_only=True)
    torch.testing.assert_close(_probe(merged), theirs, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, own_vae[1][k]) for k, v in merged.vae.state_dict().items())
    code, _, err = run_cli(["sample", "--model", str(out), "--prompt", "a photo of sks toy", "--num_images", "1",
                            "--steps", "2", "--resolution", "32", "--device", "cpu", "--out", str(tmp_path / "s")],
                           capsys)
    assert code == 0, err
    assert (tmp_path / "s" / "000.png").is_file()


def test_memory_options_and_own_vae(model, inst, own_vae, tmp_path):
    """bf16 weights, 8-bit AdamW, the step inside backward, gradient checkpointing, bf16 autocast, our kernels,
    and an fp16-safe VAE folder (--pretrained_vae_model_name_or_path): all three models train, the VAE given
    is the one used and exported."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    assert cli.main(train_args(model, inst, out, "--train_text_encoder", "--weights_dtype", "bf16", "--optimizer",
                               "adamw8bit", "--step_in_backward", "--gradient_checkpointing", "--mixed_precision",
                               "bf16", "--kernels", "on", "--pretrained_vae_model_name_or_path",
                               str(own_vae[0]), steps=2)) == 0
    log = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["skipped_steps"] == 0 and r["loss"] == r["loss"] for r in log)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(model)
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # saved as trained
    for name in ("unet", "text_encoder", "text_encoder_2"):  # changed beyond the rounding to bf16
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(a[k].float(), b[k].bfloat16().float()) for k in a), name
    assert pipe.vae.config.force_upcast is False
    assert all(torch.equal(v.float(), own_vae[1][k]) for k, v in pipe.vae.state_dict().items())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_our_kernels_at_sdxl_head_dim_64(inst, tmp_path_factory, monkeypatch, backend):
    """--kernels on (our loss and fused attention in the SDXL UNet, head dim 64 as in SDXL 1.0) against off
    (PyTorch), same seeds: the same losses and trained weights."""
    from dbkernels import _backend

    if backend == "triton" and _backend.unavailable_reason("triton", "cpu"):
        pytest.skip(_backend.unavailable_reason("triton", "cpu"))
    tmp = tmp_path_factory.mktemp("k64")
    model = build_tiny_sdxl(tmp / "sdxl-64", head_dim=64)
    logs, unets = {}, {}
    for kernels in ("off", "on"):
        if kernels == "on":
            monkeypatch.setenv("DBKERNELS_BACKEND", backend)
        out = tmp / f"out-{kernels}"
        assert cli.main(train_args(model, inst, out, "--kernels", kernels, steps=2)) == 0
        logs[kernels] = [json.loads(x)["loss"] for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
        unets[kernels] = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert logs["on"] == pytest.approx(logs["off"], rel=1e-4, abs=1e-6)
    # Adam's first steps move every weight by about lr (1e-3) whatever its gradient's size, so a float-rounding
    # difference in a near-zero gradient shows up as up to ~1e-4 in a few weights (3 of 147456 here; 1.1e-4 in
    # one weight in a CI run): a few such weights pass, a wrong kernel moves many
    for k in unets["off"]:
        a, b = unets["on"][k].float(), unets["off"][k].float()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)
        assert ((a - b).abs() > 1e-4 + 1e-3 * b.abs()).sum() <= max(3, a.numel() // 10_000), k


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_interrupt_equals_uninterrupted_run(model, inst, full_run, tmp_path, monkeypatch, lora):
    tmp, _ = full_run
    extra = ["--train_text_encoder", "--checkpointing_steps", "2", *prior_args(tmp / "cls"),
             *(["--lora_rank", "2"] if lora else [])]
    assert cli.main(train_args(model, inst, tmp_path / "whole", *extra, steps=4)) == 0
    train_until_interrupt(monkeypatch, train_args(model, inst, tmp_path / "cut", *extra, steps=4)[1:])
    assert (tmp_path / "cut" / "checkpoint-2" / ("text_encoder_2_lora" if lora else "text_encoder_2")).is_dir()
    assert cli.main(train_args(model, inst, tmp_path / "cut", *extra, "--resume_from_checkpoint", "latest",
                               steps=4)) == 0
    if lora:
        a, b = (load_file(tmp_path / d / "pytorch_lora_weights.safetensors") for d in ("whole", "cut"))
        assert a.keys() == b.keys() and any(k.startswith("text_encoder_2.") for k in a)
        assert all(torch.equal(a[k], b[k]) for k in a)
        return
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for f in (tmp_path / "whole" / name).glob("*.safetensors"):
            a, b = load_file(f), load_file(tmp_path / "cut" / name / f.name)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (name, k)


def test_bad_sdxl_input_gets_one_line(model, inst, tmp_path, capsys):
    import shutil

    refiner = build_tiny_sdxl(tmp_path / "refiner", refiner=True)
    code, _, err = run_cli(train_args(refiner, inst, tmp_path / "o1"), capsys)
    one_line_error(code, err, "--pretrained_model_name_or_path", "SDXL refiner")
    partial = tmp_path / "partial"
    shutil.copytree(model, partial)
    shutil.rmtree(partial / "text_encoder_2")
    code, _, err = run_cli(train_args(partial, inst, tmp_path / "o2"), capsys)
    one_line_error(code, err, "without text_encoder_2")
    code, _, err = run_cli(train_args(model, inst, tmp_path / "o3", "--tokenizer_max_length", "20"), capsys)
    one_line_error(code, err, "--tokenizer_max_length", "SDXL")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # an fp16-only download (only *.fp16.safetensors files): the flag that loads it, then it trains
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(model).save_pretrained(tmp_path / "fp16", variant="fp16")
    code, _, err = run_cli(train_args(tmp_path / "fp16", inst, tmp_path / "o5", steps=1), capsys)
    one_line_error(code, err, "text_encoder_2 (config.json + weights)", "add --variant fp16")
    assert cli.main(train_args(tmp_path / "fp16", inst, tmp_path / "o5", "--variant", "fp16", steps=1)) == 0
    # said before torch is imported
    import subprocess
    import sys

    code = ("import sys; from trainer import cli; rc = cli.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *train_args(refiner, inst, tmp_path / "o4")],
                          capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert done.stdout.split() == ["2", "False"], done.stderr


def ti_args(model, inst, out, *extra, steps=4):
    return ["textual-inversion", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(inst),
            "--placeholder_token", "<t>", "--initializer_token", "toy", "--output_dir", str(out), "--resolution",
            "32", "--max_train_steps", str(steps), "--learning_rate", "1e-2", "--seed", "1", "--device", "cpu",
            "--kernels", "off", "--checkpointing_steps", "2", *extra]


def test_textual_inversion_clip_l_and_clip_g(model, inst, tmp_path, monkeypatch, capsys):
    """New rows in both text encoders; the file holds clip_l and clip_g (diffusers' SDXL embedding layout), which
    diffusers' per-encoder load_textual_inversion reads back; `dbtrain sample` takes the output folder; a run
    killed at step 3 and resumed gives the same rows."""
    from diffusers import StableDiffusionXLPipeline

    from trainer.methods.embeddings import NewTokenEmbedding

    whole = tmp_path / "whole"
    assert cli.main(ti_args(model, inst, whole)) == 0
    emb = load_file(whole / "learned_embeds.safetensors")
    assert {k: tuple(v.shape) for k, v in emb.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    assert torch.equal(load_file(whole / "t.safetensors")["clip_g"], emb["clip_g"])  # the A1111 / ComfyUI name
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    start = {}
    for key, enc, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2,
                                                                          pipe.tokenizer_2)):
        start[key] = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("toy</w>")].detach().clone()
        pipe.load_textual_inversion(emb[key], token="<t>", text_encoder=enc, tokenizer=tok)  # diffusers' way
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids("<t>")]
        assert torch.equal(row, emb[key][0]) and not torch.allclose(row, start[key]), key  # trained from "toy"
    code, out, err = run_cli(["sample", "--model", str(whole), "--prompt", "a photo of <t>", "--num_images", "1",
                              "--steps", "2", "--resolution", "32", "--device", "cpu", "--out", str(tmp_path / "s")],
                             capsys)
    assert code == 0, err
    assert "write <t> in the prompt" in out
    real_step = loop.train_step
    seen = {}

    def stop_at_3(run, step):
        seen["kinds"] = [type(m) for m in run.models.values()]
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run, step)

    monkeypatch.setattr(loop, "train_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config_ti(ti_args(model, inst, tmp_path / "cut")[1:]))
    monkeypatch.setattr(loop, "train_step", real_step)
    assert seen["kinds"] == [NewTokenEmbedding, NewTokenEmbedding]  # only the rows of both encoders train
    assert (tmp_path / "cut" / "checkpoint-2" / "text_embedding_2").is_dir()
    assert cli.main(ti_args(model, inst, tmp_path / "cut", "--resume_from_checkpoint", "latest")) == 0
    again = load_file(tmp_path / "cut" / "learned_embeds.safetensors")
    assert all(torch.equal(emb[k], again[k]) for k in emb)


def config_ti(argv):
    from trainer.options import textual_inversion as ti_config

    return ti_config.parse(argv)


def test_eval_on_the_trained_sdxl_folder(full_run, model, inst, tmp_path):
    """`dbtrain eval` samples the trained SDXL folder with StableDiffusionXLPipeline (tiny local CLIP/DINO)."""
    tmp, _ = full_run
    clip_dir, dino_dir = write_tiny_judge(tmp_path, model / "tokenizer", 77)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(tmp / "out"), "--instance_data_dir", str(inst), "--num_images", "2",
                     "--steps", "2", "--clip_model", str(clip_dir), "--dino_model", str(dino_dir), "--device", "cpu",
                     "--out", str(out)]) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["identifier"] == "sks" and rec["class_noun"] == "toy"
    assert set(rec["metrics"]) == {"DINO", "CLIP-I", "CLIP-T", "PLACE", "PRES", "DIV"}
    assert Image.open(out / "prompt-0.png").size == (64, 32)  # two 32 px samples side by side
