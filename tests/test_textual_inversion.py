"""Textual Inversion and pivotal tuning in the one training loop (issue 14), on a tiny SD model (CPU).

What these catch: a run that changes any row but the placeholder's (or the UNet), an embedding file
that diffusers' own loader or the A1111/ComfyUI keys do not accept, a resume that is not bitwise the
uninterrupted run, pivotal tuning that keeps training the rows after its fraction, bad input that
gives a traceback or writes something.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from cli_helpers import one_line_error, run_cli
from trainer.world.tiny_sd import build_tiny_sd

TOKEN = "<toy-x>"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


@pytest.fixture(scope="module")
def inst(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inst")
    for k in range(3):
        im = Image.new("RGB", (32, 32), (200, 40 * k, 40))
        ImageDraw.Draw(im).ellipse((4 + k, 6, 26, 28), fill=(20, 200, 90))
        im.save(folder / f"img{k}.png")
    return folder


def ti_args(model, inst, out, *extra, steps=4):
    return ["textual-inversion", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(inst),
            "--placeholder_token", TOKEN, "--initializer_token", "toy", "--num_vectors", "2",
            "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--learning_rate", "5e-2", "--lr_warmup_steps", "0", "--output_dir", str(out), "--log_every", "1",
            "--seed", "1", "--kernels", "off", *extra]


def watch_steps(monkeypatch):
    """Wrap loop.train_step: before the first step, snapshot every frozen tensor; after each step,
    record whether each still equals the snapshot bit for bit, and the trained rows."""
    from trainer.core import loop

    real, seen = loop.train_step, {"frozen_equal": [], "rows": []}

    def frozen(run):
        state = {f"unet.{k}": v for k, v in run.unet.state_dict().items()}
        te = run.text_encoders["text_encoder"]
        state.update({f"te.{k}": v for k, v in te.state_dict().items() if not k.endswith("rows")})
        return state

    def step(run, i):
        if "snapshot" not in seen:
            seen["snapshot"] = {k: v.clone() for k, v in frozen(run).items()}
        res = real(run, i)
        now = frozen(run)
        seen["frozen_equal"].append([k for k, v in seen["snapshot"].items() if not torch.equal(v, now[k])])
        seen["rows"].append(run.trainable.new_tokens[0].rows.detach().clone())
        return res

    monkeypatch.setattr(loop, "train_step", step)
    return seen


def test_textual_inversion_trains_only_the_placeholder_rows_and_writes_files_every_ui_loads(
        tiny_model, inst, tmp_path, capsys, monkeypatch):
    seen = watch_steps(monkeypatch)
    out = tmp_path / "ti"
    code, _, err = run_cli(ti_args(tiny_model, inst, out, "--save_steps", "2"), capsys)
    assert code == 0, err
    # the table's other rows, the rest of the text encoder and the UNet: bit for bit after every step
    assert seen["frozen_equal"] == [[], [], [], []], seen["frozen_equal"]
    assert not torch.equal(seen["rows"][0], seen["rows"][-1])
    # files: the diffusers one, A1111/ComfyUI's two, per-save_steps copies; no model, no text encoder
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    for n in ("learned_embeds.safetensors", "toy-x.safetensors", "toy-x.pt", "learned_embeds-steps-2.safetensors",
              "learned_embeds-steps-4.safetensors"):
        assert n in names, names
    assert not (out / "text_encoder").exists() and not (out / "unet").exists() and not (out / "tokenizer").exists()
    learned = load_file(out / "learned_embeds.safetensors")
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, 32) and learned[TOKEN].dtype == torch.float32
    assert torch.equal(learned[TOKEN], seen["rows"][-1].float())
    # A1111 / ComfyUI: emb_params in .safetensors; string_to_param {'*': tensor}, name, step in a weights-only .pt
    assert torch.equal(load_file(out / "toy-x.safetensors")["emb_params"], learned[TOKEN])
    pt = torch.load(out / "toy-x.pt", weights_only=True)
    assert set(pt) >= {"string_to_param", "string_to_token", "name", "step"}
    assert list(pt["string_to_param"]) == ["*"] and torch.equal(pt["string_to_param"]["*"], learned[TOKEN])
    assert pt["name"] == "toy-x" and pt["step"] == 4
    rec = json.loads((out / "dreambooth.json").read_text())
    assert rec["identifier"] == TOKEN and rec["embedding"] == "learned_embeds.safetensors" and "base_model" in rec

    # diffusers' own loader takes the file, and the placeholder changes what the model draws
    from diffusers import StableDiffusionPipeline

    from trainer.formats.embedding_files import load_into as load_embedding_into

    def draw(pipe, prompt):
        g = torch.Generator().manual_seed(0)
        return pipe(prompt, num_inference_steps=2, height=32, width=32, generator=g, output_type="pt").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = draw(pipe, "a photo of toy")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, TOKEN + "_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), learned[TOKEN])
    assert not torch.equal(draw(pipe, f"a photo of {TOKEN}"), plain)
    # what dbtrain sample/eval --model OUT would load: the base model plus the embedding
    from trainer.methods.outputs import model_and_embeddings

    assert model_and_embeddings(out) == (Path(tiny_model).resolve(), [out / "learned_embeds.safetensors"])
    # our safe loader: the A1111 files give the same rows, named by file
    for f in ("toy-x.pt", "toy-x.safetensors"):
        p2 = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
        tok = load_embedding_into(p2, out / f)
        assert tok == ("toy-x" if f.endswith(".pt") else "<toy-x>")
        ids2 = p2.tokenizer.convert_tokens_to_ids([tok, tok + "_1"])
        assert torch.equal(p2.text_encoder.get_input_embeddings().weight[ids2].detach(), learned[TOKEN])
    # dbtrain sample: the TI folder as --model, and a base model with --embedding FILE (A1111's .pt)
    for model, extra, tok in ((out, [], TOKEN), (tiny_model, ["--embedding", str(out / "toy-x.pt")], "toy-x")):
        samples = tmp_path / f"samples-{tok.strip('<>')}"
        code, got, err = run_cli(["sample", "--model", str(model), *extra, "--prompt", f"a photo of {tok}",
                                  "--num_images", "1", "--steps", "2", "--resolution", "32", "--device", "cpu",
                                  "--out", str(samples)], capsys)
        assert code == 0, err
        assert f"write {tok} in the prompt" in got and (samples / "000.png").is_file()
    code, _, err = run_cli(["sample", "--model", str(tiny_model), "--embedding", str(tmp_path / "none.pt"),
                            "--prompt", "x", "--out", str(tmp_path / "s3")], capsys)
    assert code == 2 and "--embedding" in err and "none.pt" in err, err


def test_textual_inversion_resumes_bitwise_after_a_hard_stop(tiny_model, inst, tmp_path, capsys, monkeypatch):
    from trainer.core import loop

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    code, _, err = run_cli(ti_args(tiny_model, inst, full, "--checkpointing_steps", "2", steps=5), capsys)
    assert code == 0, err
    real, calls = loop.train_step, []

    def die_at_step_3(run, step):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt  # a second Ctrl-C: stops at once, no checkpoint of its own
        return real(run, step)

    monkeypatch.setattr(loop, "train_step", die_at_step_3)
    argv = ti_args(tiny_model, inst, stopped, "--checkpointing_steps", "2", steps=5)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and "resume with: dbtrain textual-inversion" in err, err
    assert (stopped / "checkpoint-2" / "text_embedding" / "learned_embeds.safetensors").is_file()
    assert not (stopped / "checkpoint-2" / "unet").exists()  # nothing is stored for the frozen UNet
    monkeypatch.setattr(loop, "train_step", real)
    code, out, err = run_cli(argv + ["--resume_from_checkpoint", "latest"], capsys)
    assert code == 0, err
    assert "at step 2" in out
    a, b = load_file(full / "learned_embeds.safetensors"), load_file(stopped / "learned_embeds.safetensors")
    assert torch.equal(a[TOKEN], b[TOKEN])


def test_pivotal_tuning_trains_the_rows_for_the_first_fraction_then_freezes_them(tiny_model, inst, tmp_path, capsys,
                                                                                monkeypatch):
    seen = watch_steps(monkeypatch)
    out = tmp_path / "pivotal"
    code, stdout, err = run_cli(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                                 str(inst), "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out),
                                 "--resolution", "32", "--max_train_steps", "4", "--learning_rate", "1e-3",
                                 "--train_text_embedding", "--text_embedding_frac", "0.5", "--optimizer", "adamw",
                                 "--kernels", "off", "--seed", "2"], capsys)
    assert code == 0, err
    assert "placeholder: <sks>" in stdout
    rows = seen["rows"]
    assert not torch.equal(rows[0], rows[1])  # trained in steps 1-2 ...
    assert torch.equal(rows[1], rows[2]) and torch.equal(rows[2], rows[3])  # ... frozen in steps 3-4
    assert any("unet." in k for k in seen["frozen_equal"][0])  # the UNet trains
    assert not any(k.startswith("te.") for changed in seen["frozen_equal"] for k in changed)  # the table does not
    assert (out / "model_index.json").is_file() and (out / "learned_embeds.safetensors").is_file()
    assert torch.equal(load_file(out / "learned_embeds.safetensors")["<sks>"], rows[-1].float())
    from trainer.methods.outputs import model_and_embeddings

    assert model_and_embeddings(out) == (out, [out / "learned_embeds.safetensors"])
    # the exported text encoder is the base one (no new rows in it)
    base = load_file(Path(tiny_model) / "text_encoder" / "model.safetensors")
    mine = load_file(out / "text_encoder" / "model.safetensors")
    assert all(torch.equal(base[k], mine[k]) for k in base)


def test_text_embedding_lr_is_the_rows_own_rate_and_leaves_the_unet_alone(tiny_model, inst, tmp_path, capsys):
    """One step of pivotal tuning twice, the rows' rate 100x the UNet's the second time: the UNet takes the
    same step bit for bit, the new row moves 100x as far (Adam's first step and the decay both scale with lr)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    def one_step(out, *extra):
        code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                                str(inst), "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out),
                                "--resolution", "32", "--max_train_steps", "1", "--learning_rate", "1e-4",
                                "--lr_warmup_steps", "0", "--train_text_embedding", "--optimizer", "adamw",
                                "--kernels", "off", "--seed", "2", *extra], capsys)
        assert code == 0, err
        return (load_file(out / "learned_embeds.safetensors")["<sks>"].float(),
                load_file(out / "unet" / "diffusion_pytorch_model.safetensors"))

    row_same, unet_same = one_step(tmp_path / "same")
    row_own, unet_own = one_step(tmp_path / "own", "--text_embedding_lr", "1e-2")
    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    start = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").get_input_embeddings().weight[
        tok.convert_tokens_to_ids("sks</w>")].detach()
    assert all(torch.equal(unet_same[k], unet_own[k]) for k in unet_same)
    ratio = (row_own - start).norm() / (row_same - start).norm()
    assert 95 < ratio < 105, ratio


def test_bad_input_is_one_line_and_writes_nothing(tiny_model, inst, tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--placeholder_token", "sks"], "'sks' is already in the tokenizer's vocabulary"),
        (["--initializer_token", "zebra"], "--initializer_token 'zebra' is 5 tokens"),
        (["--initializer_token", "two words"], "--initializer_token must be one token"),
        (["--num_vectors", "0"], "--num_vectors must be >= 1"),
        (["--train_data_dir", str(tmp_path / "missing")], "--train_data_dir"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(ti_args(tiny_model, inst, out) + extra, capsys)
        one_line_error(code, err, message)
        assert not out.exists(), extra
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                            str(inst), "--instance_prompt", "a [V] toy", "--output_dir", str(out),
                            "--train_text_embedding", "--text_embedding_frac", "1.5"], capsys)
    one_line_error(code, err, "--text_embedding_frac must be > 0 and <= 1")
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                            str(inst), "--instance_prompt", "a [V] toy", "--output_dir", str(out),
                            "--train_text_embedding", "--text_embedding_lr", "0"], capsys)
    one_line_error(code, err, "--text_embedding_lr must be > 0")
    assert not out.exists()
    code, _, err = run_cli(["train", "--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                            str(inst), "--instance_prompt", "a [V] toy", "--output_dir", str(out),
                            "--text_embedding_lr", "5e-3"], capsys)  # would be ignored: nothing to apply it to
    one_line_error(code, err, "--text_embedding_lr is the learning rate of --train_text_embedding's")
    assert not out.exists()


def test_methods_bench_estimates_and_intervals():
    """The table's numbers: means over images; DIV over distinct pairs only (a zero diagonal would pull it
    down); intervals that hold the mean and narrow with more images."""
    import numpy as np

    from bench.methods import bootstrap, estimates

    rng = np.random.default_rng(0)

    def row(n):
        d = rng.uniform(0.5, 1.5, size=(3, n, n))
        d = (d + d.transpose(0, 2, 1)) / 2
        d[:, np.arange(n), np.arange(n)] = 0.0
        return {"per_image": {"DINO": rng.normal(0.3, 0.1, (3, n)).tolist(), "CLIP-I": rng.normal(0.2, 0.1, (3, n)).tolist(),
                              "CLIP-T": rng.normal(0.5, 0.1, (3, n)).tolist(), "PRES": rng.normal(0, 0.1, n).tolist(),
                              "DIV": d.tolist()}}

    small, big = [row(4), row(4)], [row(64), row(64)]
    m = estimates(small)
    assert abs(m["DINO"] - np.mean([np.mean(r["per_image"]["DINO"]) for r in small])) < 1e-12
    assert m["DIV"] > 0.9  # the mean of uniform(0.5, 1.5) off the diagonal, not diluted by the zeros
    for rows in (small, big):
        ci, m = bootstrap(rows), estimates(rows)
        assert all(ci[k][0] <= m[k] <= ci[k][1] for k in m), (ci, m)
    wide, narrow = bootstrap(small), bootstrap(big)
    assert narrow["DINO"][1] - narrow["DINO"][0] < wide["DINO"][1] - wide["DINO"][0]
