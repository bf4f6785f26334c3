"""dbtrain against diffusers' own example scripts, side by side on the built-in world (issue 29).

    python -m bench peers --diffusers_examples DIR [--parts transforms,train,fabric] [--seeds 0 1 2]
    python -m bench peers report

DIR is the examples/ folder of a diffusers checkout you have (git clone https://github.com/huggingface/diffusers);
its scripts need torchvision. Nothing is downloaded: both sides train the built-in tiny model on the built-in
subject, on this machine's CPU.

- transforms: every training view of a copied command line, ours (+ --diffusers_defaults) against the script's
  own dataset code, bitwise (bench/peer_transforms.py).
- train: Textual Inversion (textual_inversion.py), LoRA (train_dreambooth_lora.py) and full DreamBooth
  (train_dreambooth.py), one command line each, run as the script and as `dbtrain train` /
  `textual-inversion` with the same line + --diffusers_defaults. Per run: optimizer steps per second (a step
  hook's clock, bench/peer_run.py: loading and saving count for neither), peak RSS of the process, and the
  judge's DINO, CLIP-I, CLIP-T, PRES, DIV of its result with 95% bootstrap intervals over images. The two
  sides of a seed run one after the other, the order alternating, so the machine's load falls on both.
- fabric: `dbtrain fabric`'s sampler against diffusers' community FabricPipeline (examples/community/
  pipeline_fabric.py) with the same settings, one liked image: time per image and peak RSS above the
  start (interleaved repeats), and the judge's similarity of the images to the liked one, with and without it.

Rows go to <out>/{transforms,train,fabric}.jsonl (a part's file is replaced when it runs), each with its
commands; report writes <out>/peers.md from them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import peer_transforms
from bench.fabric import _write_rows

OUT = Path("bench/results/peers")
REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"ti": "textual_inversion/textual_inversion.py", "lora": "dreambooth/train_dreambooth_lora.py",
           "full": "dreambooth/train_dreambooth.py"}
FABRIC_PIPELINE = "community/pipeline_fabric.py"
# the recipe of bench/methods.py (300 steps, batch 2, constant lr) in the scripts' own flags
STEPS, NUM_CLASS, EVAL_IMAGES, SAMPLE_STEPS, GUIDANCE = 300, 50, 8, 20, 5.0
LR = {"ti": 5e-3, "lora": 3e-3, "full": 2e-4}
TOKEN, IDENTIFIER = "<sks>", "sks"
# FABRIC: the community pipeline's defaults where they differ from ours, given to both sides; DDIM, as the
# community pipeline's scheduler.add_noise(z, noise, t) with a 0-d t fails in the model's DPMSolverMultistep
FABRIC = {"steps": 20, "guidance": 7.0, "feedback_start": 0.33, "feedback_end": 0.66, "min_weight": 0.05,
          "max_weight": 0.8, "neg_scale": 0.5, "scheduler": "DDIMScheduler"}


def check_examples(examples) -> str | None:
    """One line saying what is missing, or None."""
    if not examples:
        return ("python -m bench peers needs --diffusers_examples DIR, the examples/ folder of a diffusers checkout "
                "(git clone https://github.com/huggingface/diffusers; DIR = diffusers/examples)")
    missing = [p for p in (*SCRIPTS.values(), FABRIC_PIPELINE) if not (Path(examples) / p).is_file()]
    if missing:
        return f"--diffusers_examples {examples} has no {', '.join(missing)}: give the examples/ folder of a checkout"
    try:
        __import__("torchvision")
    except Exception as e:  # noqa: BLE001  (PyPI's wheel beside a CPU build of torch fails to import)
        return (f"diffusers' scripts need torchvision, which does not import here ({type(e).__name__}: {e}); "
                f"install a matching torch + torchvision pair in a venv and run this there")
    return None


def script_version(examples) -> str:
    text = (Path(examples) / SCRIPTS["full"]).read_text()
    m = re.search(r'check_min_version\("([^"]+)"\)', text)
    return m.group(1) if m else "?"


def env(examples=None) -> dict:
    """bench fabric's environment fields, with the CPU named in `device`, diffusers and the scripts' version."""
    import diffusers

    from bench.fabric import _env

    out = {**_env(), "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "diffusers": diffusers.__version__}
    if examples:
        out["examples_version"] = script_version(examples)
    return out


def their_argv(method: str, model, subject, class_dir, out, seed: int, steps: int) -> list[str]:
    """The command line, in the script's flags (ours reads the same line)."""
    common = ["--pretrained_model_name_or_path", str(model), "--resolution", "64", "--train_batch_size", "2",
              "--max_train_steps", str(steps), "--learning_rate", str(LR[method]), "--lr_scheduler", "constant",
              "--lr_warmup_steps", "0", "--seed", str(seed), "--output_dir", str(out)]
    if method == "ti":
        return ["--train_data_dir", str(subject), "--placeholder_token", TOKEN, "--initializer_token", IDENTIFIER,
                "--learnable_property", "object", *common]
    from trainer.world import scenes

    noun = scenes.SUBJECT_CLASS
    args = ["--instance_data_dir", str(subject), "--instance_prompt", f"a {IDENTIFIER} {noun}",
            "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", f"a {noun}",
            "--num_class_images", str(NUM_CLASS), *common]
    return args + (["--rank", "4"] if method == "lora" else [])


def _launch(side: str, method: str, argv: list[str], examples, times: Path) -> list[str]:
    head = [sys.executable, "-m", "bench.peer_run", "--times", str(times)]
    if side == "diffusers":
        return head + ["--", str(Path(examples) / SCRIPTS[method]), *argv]
    command = "textual-inversion" if method == "ti" else "train"
    return head + ["-m", "trainer", command, *argv, "--diffusers_defaults"]


def run(cmd: list[str], log: Path, threads: int) -> tuple[int, int, float]:
    """(exit code, peak RSS bytes of the process, wall seconds)."""
    environ = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=environ, cwd=REPO)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0


def steps_per_second(times_file: Path, skip: int = 5) -> tuple[int, float | None]:
    t = json.loads(times_file.read_text())["step_times"]
    if len(t) <= skip + 1:
        return len(t), None
    return len(t), (len(t) - 1 - skip) / (t[-1] - t[skip])


def draw_class_images(model, folder: Path, n: int) -> None:
    """The class images both sides read (drawn once here, so neither run draws them)."""
    from trainer.methods.outputs import load_pipeline
    from trainer.world import scenes
    from trainer.world.evaluate import generate

    have = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if len(have) >= n:
        return
    folder.mkdir(parents=True, exist_ok=True)
    prompt = f"a {scenes.SUBJECT_CLASS}"
    for k, im in enumerate(generate(load_pipeline(model, "cpu"), [prompt], n, SAMPLE_STEPS, GUIDANCE, 50_000,
                                    batch=n)[prompt]):
        im.save(folder / f"class-{k:03d}.png")


def pipeline_of(side: str, method: str, out: Path, model):
    """The pipeline that samples a run's result, and the word for [V]."""
    from trainer.methods.outputs import load_pipeline

    if side == "dbtrain" or method == "full":  # our output folders (and their full pipeline) load as a model
        return load_pipeline(out, "cpu"), TOKEN if method == "ti" else IDENTIFIER
    if method == "ti":
        return load_pipeline(model, "cpu", embedding_files=[out / "learned_embeds.safetensors"]), TOKEN
    return load_pipeline(model, "cpu", lora_files=[out / "pytorch_lora_weights.safetensors"]), IDENTIFIER


def score(pipe, word: str, seed: int, scorer, real, n_images: int, templates) -> dict:
    from bench.methods import bootstrap, estimates, per_image
    from trainer.world import scenes
    from trainer.world.evaluate import generate, subject_prompts

    pairs, class_prompt = subject_prompts(templates, word, scenes.SUBJECT_CLASS)
    samples = generate(pipe, list(pairs) + [class_prompt], n_images, SAMPLE_STEPS, GUIDANCE, 10_000 + seed)
    row = {"per_image": per_image(scorer, real, samples, pairs, class_prompt)}
    return {**estimates([row]), "ci95": bootstrap([row]), "prompts": list(pairs)}


def train_part(a, rows_file: Path) -> list[dict]:
    import torch

    from trainer.options.sampling import DEFAULT_PROMPTS
    from trainer.world import demo, scenes
    from trainer.world.metrics import Scorer
    from trainer.world.tiny import MODEL_DIR

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    subject = demo.write_subject(work / "subject")
    class_dir = work / "class-images"
    draw_class_images(MODEL_DIR, class_dir, NUM_CLASS)
    scorer, real = Scorer(device=torch.device("cpu")), scenes.subject_images(5)
    rows, info = [], env(a.diffusers_examples)
    for k, seed in enumerate(a.seeds):
        for j, method in enumerate(a.methods):
            sides = ("dbtrain", "diffusers") if (k + j) % 2 == 0 else ("diffusers", "dbtrain")
            for side in sides:
                out = work / f"seed{seed}-{method}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                argv = their_argv(method, MODEL_DIR, subject, class_dir, out, seed, a.steps)
                times = work / f"seed{seed}-{method}-{side}.times.json"
                cmd = _launch(side, method, argv, a.diffusers_examples, times)
                code, rss, wall = run(cmd, work / f"seed{seed}-{method}-{side}.log", a.threads)
                row = {"part": "train", "method": method, "side": side, "seed": seed, "steps": a.steps,
                       "exit_code": code, "peak_rss_bytes": rss, "wall_s": round(wall, 2),
                       "command": " ".join(cmd[4:]).replace(str(REPO) + "/", ""), **info}
                if code == 0:
                    n, rate = steps_per_second(times)
                    pipe, word = pipeline_of(side, method, out, MODEL_DIR)
                    row.update(optimizer_steps=n, steps_per_s=rate,
                               **score(pipe, word, seed, scorer, real, a.eval_images, DEFAULT_PROMPTS))
                    del pipe
                rows.append(row)
                _write_rows(rows_file, rows)
                print(f"seed {seed} {method} {side}: exit {code}, "
                      + (f"{row['steps_per_s']:.2f} steps/s, peak RSS {rss / 2**20:.0f} MiB, DINO "
                         f"{row['DINO']:.3f}" if code == 0 else f"see {work}/seed{seed}-{method}-{side}.log"),
                      flush=True)
    return rows


_A_B = ((0, (".lora_A.weight", ".lora.down.weight")), (1, (".lora_B.weight", ".lora.up.weight")))


def _adapters(path: Path) -> dict:
    """{module: [A, B]} of a diffusers LoRA file, either naming (lora_A/lora_B, lora.down/lora.up)."""
    from safetensors.torch import load_file

    out = {}
    for key, tensor in load_file(str(path)).items():
        for a_or_b, names in _A_B:
            for name in names:
                if key.endswith(name):
                    out.setdefault(key[: -len(name)], [None, None])[a_or_b] = tensor.float()
    return out


def _adapter_shapes(path: Path) -> dict:
    """{module: (A shape, B shape)}."""
    return {k: tuple(tuple(t.shape) for t in v) for k, v in _adapters(path).items()}


def update_norm(path: Path) -> float:
    """Frobenius norm of every module's weight change B @ A together (alpha = rank: scale 1)."""
    return float(sum(float((b @ a).norm() ** 2) for a, b in _adapters(path).values()) ** 0.5)


def adapters_part(a) -> list[dict]:
    """The LoRA files of the train part's runs, module by module: which modules carry adapters, and their shapes."""
    rows, info = [], env(a.diffusers_examples)
    for seed in a.seeds:
        files = {s: Path(a.work) / f"seed{seed}-lora-{s}" / "pytorch_lora_weights.safetensors"
                 for s in ("dbtrain", "diffusers")}
        if not all(f.is_file() for f in files.values()):
            continue
        ours, theirs = (_adapter_shapes(files[s]) for s in ("dbtrain", "diffusers"))
        rows.append({"part": "adapters", "seed": seed, "modules_dbtrain": len(ours), "modules_diffusers": len(theirs),
                     "only_dbtrain": sorted(set(ours) - set(theirs)), "only_diffusers": sorted(set(theirs) - set(ours)),
                     "shapes_differ": sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k]),
                     "update_norm": {s: update_norm(f) for s, f in files.items()},
                     "files": {s: str(f) for s, f in files.items()}, **info})
    return rows


def their_fabric(examples, model):
    """diffusers' community FabricPipeline on the model's own parts (a copy of its own, as it patches the UNet)."""
    import importlib.util

    import diffusers
    from diffusers import StableDiffusionPipeline

    spec = importlib.util.spec_from_file_location("peer_pipeline_fabric", Path(examples) / FABRIC_PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe = module.FabricPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                 scheduler=getattr(diffusers, FABRIC["scheduler"]).from_config(sd.scheduler.config),
                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fabric_part(a) -> list[dict]:
    import torch

    from bench.fabric import PROMPT, _ci95, _measure, target_image
    from trainer.fabric.sampling import fabric_sample, load_pipeline, target_similarity
    from trainer.world.metrics import Scorer
    from trainer.world.tiny import MODEL_DIR

    torch.set_num_threads(a.threads)
    ours, theirs = load_pipeline(MODEL_DIR, "cpu"), their_fabric(a.diffusers_examples, MODEL_DIR)
    liked, n, f = target_image(), a.fabric_images, FABRIC
    scorer = Scorer(device=torch.device("cpu"))

    def draw(side: str, feedback: bool, seed: int):
        refs = [liked] if feedback else []
        with torch.no_grad():
            if side == "dbtrain":
                return fabric_sample(ours, PROMPT, refs, [], negative_prompt="", seeds=list(range(seed, seed + n)),
                                     steps=f["steps"], guidance_scale=f["guidance"],
                                     feedback_start=f["feedback_start"], feedback_end=f["feedback_end"],
                                     min_weight=f["min_weight"], max_weight=f["max_weight"],
                                     neg_scale=f["neg_scale"], scheduler=f["scheduler"], note=None).images
            return theirs(prompt=PROMPT, negative_prompt="", liked=refs, disliked=[], height=64, width=64,
                          generator=torch.Generator().manual_seed(seed), num_images=n, guidance_scale=f["guidance"],
                          num_inference_steps=f["steps"], feedback_start_ratio=f["feedback_start"],
                          feedback_end_ratio=f["feedback_end"], min_weight=f["min_weight"],
                          max_weight=f["max_weight"], neg_scale=f["neg_scale"]).images

    draw("dbtrain", True, 0), draw("diffusers", True, 0)  # warm-up
    got = {(s, fb): {"times": [], "peaks": [], "clip": [], "dino": []} for s in ("dbtrain", "diffusers")
           for fb in (True, False)}
    for r in range(a.fabric_repeats):
        for side in (("dbtrain", "diffusers") if r % 2 == 0 else ("diffusers", "dbtrain")):
            for feedback in (True, False):
                box = {}
                dt, peak = _measure(lambda: box.update(images=draw(side, feedback, 1000 + r * n)))
                g = got[(side, feedback)]
                g["times"].append(dt / n)
                g["peaks"].append(peak)
                for emb in ("clip", "dino"):
                    g[emb] += target_similarity(scorer, box["images"], liked, emb)
    rows, info = [], env(a.diffusers_examples)
    for (side, feedback), g in got.items():
        rows.append({"part": "fabric", "side": side, "liked": 1 if feedback else 0, "images": len(g["clip"]),
                     "images_per_call": n,
                     "ms_per_image_p50": 1000 * statistics.median(g["times"]), "ms_per_image": [1000 * t for t in
                                                                                              g["times"]],
                     "peak_rss_above_start_bytes": max(g["peaks"]),
                     **{f"similarity_{e}": _ci95(g[e]) for e in ("clip", "dino")},
                     "per_image": {e: g[e] for e in ("clip", "dino")}, "settings": {**f, "prompt": PROMPT,
                                                                                 "resolution": 64},
                     "command": "python -m bench peers --parts fabric " + " ".join(a.argv), **info})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.strip().splitlines()[0])
    p.add_argument("what", nargs="?", choices=("run", "report"), default="run")
    p.add_argument("--diffusers_examples", metavar="DIR", help="examples/ folder of a diffusers checkout")
    p.add_argument("--parts", default="transforms,train,adapters,fabric",
                   help="adapters reads the LoRA files the train part left in --work")
    p.add_argument("--methods", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eval_images", type=int, default=EVAL_IMAGES, help="images per prompt")
    p.add_argument("--fabric_images", type=int, default=8, help="images per FABRIC call")
    p.add_argument("--fabric_repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/dbtrain-peers", help="scratch folder for the runs")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    a.argv = argv
    out = Path(a.out)
    if a.what == "report":
        from bench.peers_report import write_report

        print(write_report(out))
        return 0
    problem = check_examples(a.diffusers_examples)
    if problem:
        print(f"bench peers: {problem}", file=sys.stderr)
        return 2
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = set(parts) - {"transforms", "train", "adapters", "fabric"}
    if unknown:
        print(f"bench peers: unknown --parts {', '.join(sorted(unknown))}: transforms, train, adapters, fabric",
              file=sys.stderr)
        return 2
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if "transforms" in parts:
        from trainer.world.tiny import MODEL_DIR

        rows = peer_transforms.compare(Path(a.diffusers_examples), MODEL_DIR, Path(a.work) / "transforms")
        info = env(a.diffusers_examples)
        _write_rows(out / "transforms.jsonl", [{"part": "transforms", **r, **info} for r in rows])
        print(f"transforms: {sum(r['equal'] for r in rows)} of {len(rows)} views bitwise equal", flush=True)
    if "train" in parts:
        train_part(a, out / "train.jsonl")
    if "adapters" in parts:
        _write_rows(out / "adapters.jsonl", adapters_part(a))
    if "fabric" in parts:
        _write_rows(out / "fabric.jsonl", fabric_part(a))
    from bench.peers_report import write_report

    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
