"""What a new user tripped on (issue 34, items 2, 3, 4 and part of 7).

A class folder that is (or holds, or sits in) the photo folder; an instance prompt or caption without
[V] / the identifier (Textual Inversion's placeholder likewise); `dbtrain` installed without torch;
the package's files and dependency bounds; HEIC photos; panoramas; bootstrap.sh's torch line.
Each bad input is one `dbtrain: error:` line (exit 2), each change of the input one note line.
"""
from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import one_line_error, run_cli
from trainer import cli
from trainer.core import images, prompts
from trainer.errors import UserError
from trainer.options import textual_inversion
from trainer.options import train as config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch):
    monkeypatch.setattr(images, "_said", set(), raising=False)  # said once per process; each test anew


def photos(folder: Path, n: int = 3, size=(32, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", size, (200, 40 * k, 40)).save(folder / f"img{k}.png")
    return folder


def train_argv(inst: Path, prompt: str, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(inst), "--instance_prompt", prompt,
            *extra]


# ----------------------------------------------------------------------------- 2: the class folder

def test_class_folder_equal_inside_or_containing_the_photo_folder_is_refused(tmp_path, capsys):
    """Before: the photos counted as class images and class-0000N.png were written among them."""
    inst = photos(tmp_path / "subject")
    (tmp_path / "link").symlink_to(inst, target_is_directory=True)
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog"]
    for cls in (inst, tmp_path / "subject" / "." , inst / "class", tmp_path, tmp_path / "link",
                tmp_path / "link" / "more"):
        code, out, err = run_cli(["train", *train_argv(inst, "a photo of [V] dog", *prior,
                                                       "--class_data_dir", str(cls))], capsys)
        one_line_error(code, err, "--class_data_dir", "--instance_data_dir", "a folder of its own")
    assert sorted(p.name for p in inst.iterdir()) == ["img0.png", "img1.png", "img2.png"]  # nothing written
    # a folder beside the photos is fine, and so is the same folder without prior preservation (not read)
    opts = config.parse(train_argv(inst, "a photo of [V] dog", *prior, "--class_data_dir", str(tmp_path / "cls")))
    assert opts.prior.class_data_dir == str(tmp_path / "cls")
    config.parse(train_argv(inst, "a photo of [V] dog", "--class_data_dir", str(inst)))


# ----------------------------------------------------------------------------- 3: the identifier

def test_instance_prompt_without_the_identifier_is_refused(tmp_path, capsys):
    """Before: "a purple cross" trained silently, printing "identifier: sks"."""
    inst = photos(tmp_path / "inst")
    code, out, err = run_cli(["train", *train_argv(inst, "a purple cross")], capsys)
    one_line_error(code, err, "--instance_prompt 'a purple cross'", "[V]", "sks", "--prompt_without_identifier")
    # the identifier written out, or [V], is what diffusers' command lines do: accepted
    for prompt, extra in (("a photo of sks dog", ()), ("a [V] dog", ()), ("a zwx, dog", ("--identifier", "zwx")),
                          ("a [V] dog", ("--identifier", "auto")), ("a [V] dog", ("--train_text_embedding",)),
                          ("a <sks> dog", ("--train_text_embedding",)),
                          ("a <my-dog> dog", ("--train_text_embedding", "--placeholder_token", "<my-dog>"))):
        config.parse(train_argv(inst, prompt, *extra))
    # a word that merely contains it is not it; with auto (picked later) or pivotal tuning (new tokens) [V] is needed
    for prompt, extra, part in (("a photo of asks dog", (), "sks"),
                                ("a sks dog", ("--identifier", "auto"), "--identifier auto"),
                                ("a sks dog", ("--train_text_embedding",), "--train_text_embedding")):
        code, out, err = run_cli(["train", *train_argv(inst, prompt, *extra)], capsys)
        one_line_error(code, err, "--instance_prompt", part, "[V]")
    opts = config.parse(train_argv(inst, "a purple cross", "--prompt_without_identifier"))
    assert opts.data.prompt_without_identifier


def test_caption_files_without_the_identifier_are_refused(tmp_path, capsys):
    inst = photos(tmp_path / "inst")
    (inst / "img0.txt").write_text("a [V] dog on the beach\n")
    (inst / "img1.txt").write_text("\n a dog in the snow\n")
    argv = train_argv(inst, "a [V] dog", "--caption_extension", ".txt")
    code, out, err = run_cli(["train", *argv], capsys)
    one_line_error(code, err, "img1.txt", "a dog in the snow", "[V]", "--prompt_without_identifier")
    config.parse(argv + ["--prompt_without_identifier"])
    (inst / "img1.txt").write_text("a sks dog in the snow")
    config.parse(argv)


def test_textual_inversion_prompt_and_captions_need_the_placeholder(tmp_path, capsys):
    inst = photos(tmp_path / "inst")
    base = ["textual-inversion", "--pretrained_model_name_or_path", "m", "--train_data_dir", str(inst),
            "--placeholder_token", "<cat-toy>", "--initializer_token", "toy"]
    code, out, err = run_cli(base + ["--instance_prompt", "a purple cross"], capsys)
    one_line_error(code, err, "--instance_prompt 'a purple cross'", "<cat-toy>", "--prompt_without_identifier")
    opts = textual_inversion.parse(base[1:] + ["--instance_prompt", "a purple cross", "--prompt_without_identifier"])
    assert opts.data.instance_prompt == "a purple cross" and opts.data.prompt_templates is None
    assert textual_inversion.parse(base[1:] + ["--instance_prompt", "a <cat-toy> toy"]).data.instance_prompt \
        == "a [V] toy"
    (inst / "img0.txt").write_text("a <cat-toy> on the beach")
    (inst / "img1.txt").write_text("a [V] in the snow")
    (inst / "img2.txt").write_text("a toy in space")
    code, out, err = run_cli(base + ["--caption_extension", ".txt"], capsys)
    one_line_error(code, err, "img2.txt", "<cat-toy>", "--prompt_without_identifier")
    textual_inversion.parse(base[1:] + ["--caption_extension", ".txt", "--prompt_without_identifier"])
    help_text = textual_inversion.build_ti_parser().format_help()
    assert "placeholder" in " ".join(help_text.split("--prompt_without_identifier")[1].split()[:30])


def test_run_prompts_note_a_prompt_without_the_word_and_expand_the_placeholder(tmp_path, capsys):
    inst = photos(tmp_path / "inst")
    opts = config.parse(train_argv(inst, "a purple cross", "--prompt_without_identifier"))
    capsys.readouterr()
    run = prompts.RunPrompts(opts, "sks", [None, "a [V] cross", None])
    assert run.instance == ["a purple cross", "a sks cross", "a purple cross"]
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("dbtrain: note:")]
    assert len(notes) == 1 and "'a purple cross'" in notes[0] and "sks" in notes[0], notes
    # a prompt that names the subject says nothing
    opts = config.parse(train_argv(inst, "a [V] cross"))
    capsys.readouterr()  # (parsing notes how diffusers' defaults differ)
    prompts.RunPrompts(opts, "sks", [None])
    assert "note" not in capsys.readouterr().err
    # pivotal tuning / TI with several vectors: the placeholder written out gets all of them, as [V] does
    opts = config.parse(train_argv(inst, "a <sks> dog", "--train_text_embedding", "--num_vectors", "2"))
    run = prompts.RunPrompts(opts, "<sks> <sks>_1", ["a [V] toy", "<sks>, in space", None])
    assert run.instance == ["a <sks> <sks>_1 toy", "<sks> <sks>_1, in space", "a <sks> <sks>_1 dog"]
    # a prompt that reaches the loop without the word (options built by hand) is still refused
    opts = config.parse(train_argv(inst, "a [V] dog"))
    opts.data.instance_prompt = "a purple cross"
    with pytest.raises(UserError, match="--prompt_without_identifier"):
        prompts.RunPrompts(opts, "sks", [None])


def test_prompt_without_identifier_trains_with_a_note(tmp_path, capsys):
    from trainer.options.sampling import BUILTIN_MODEL  # (on disk already: nothing to build)

    inst = photos(tmp_path / "inst")
    code, out, err = run_cli(["train", "--pretrained_model_name_or_path", str(BUILTIN_MODEL), "--instance_data_dir",
                              str(inst), "--instance_prompt", "a purple cross", "--prompt_without_identifier",
                              "--output_dir", str(tmp_path / "out"), "--resolution", "32", "--max_train_steps", "1",
                              "--optimizer", "adamw", "--kernels", "off"], capsys)
    assert code == 0, err
    notes = [x for x in err.splitlines() if "--prompt_without_identifier" in x]
    assert len(notes) == 1 and notes[0].startswith("dbtrain: note:") and "does not name sks" in notes[0], err


# ----------------------------------------------------------------------------- 4: installing it as a package

def test_dbtrain_without_torch_says_how_to_install_it(tmp_path):
    """Before: `dbtrain train ...` in a venv without torch died with a ModuleNotFoundError traceback."""
    code = ("import sys; sys.modules['torch'] = None\n"  # an import of torch now fails as if it were not installed
            "from trainer.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    for argv in (["train", "--help"], ["estimate", "--arch", "sd15"], ["demo"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dbtrain: error: torch is not installed"), r.stderr
        for part in (f"pip install torch=={cli.TORCH_PIN} --index-url https://download.pytorch.org/whl/cpu",
                     f"pip install torch=={cli.TORCH_PIN}", 'pip install ".[train]"', "docs/install.md"):
            assert part in lines[0], lines[0]
    # the top-level usage needs nothing
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0 and "dbtrain train" in r.stdout


def test_dbtrain_without_the_train_extra_says_so(tmp_path):
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "from trainer.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "estimate", "--arch", "sd15"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "diffusers" in lines[0] and 'pip install ".[train]"' in lines[0], lines[0]


def _requirement(reqs: list[str], name: str):
    from packaging.requirements import Requirement

    found = [Requirement(r) for r in reqs if Requirement(r).name.lower() == name]
    assert len(found) == 1, (name, reqs)
    return found[0]


def test_package_bounds_agree_with_the_pins():
    """Before: numpy was not capped in the metadata (2.4.6 installed) although the tests pin numpy<2.4."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    train = meta["dependencies"] + meta["optional-dependencies"]["train"]
    pins = [x.strip() for x in (ROOT / "requirements-test.txt").read_text().splitlines()
            if x.strip() and not x.startswith("#")]
    from packaging.requirements import Requirement

    for pin in pins:
        req = Requirement(pin)
        if req.name == "pytest":
            continue
        ours = _requirement(train, req.name)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        for version in exact:  # what the tests run on is allowed
            assert ours.specifier.contains(version, prereleases=True), (ours, pin)
        for s in req.specifier:
            if s.operator == "<":  # and the tests' caps hold for the package too
                assert not ours.specifier.contains(s.version, prereleases=True), (ours, pin)
    boot = (ROOT / "bootstrap.sh").read_text()
    torch_pin = re.search(r"DBK_TORCH:-torch==([\w.]+)", boot).group(1)
    triton_pin = re.search(r'"triton==([\w.]+)"', boot).group(1)
    assert torch_pin == cli.TORCH_PIN
    assert _requirement(train, "torch").specifier.contains(torch_pin)
    assert _requirement(train, "torch").specifier.contains(torch_pin + "+cpu")  # the CPU build installed first
    assert not _requirement(train, "torch").specifier.contains("2.14.1")  # what an unpinned install would pull
    assert _requirement(meta["optional-dependencies"]["triton"], "triton").specifier.contains(triton_pin)
    assert "dbtrain" in meta["scripts"]
    ui_pins = [Requirement(x) for x in (ROOT / "requirements-ui-test.txt").read_text().splitlines()
               if x.strip() and not x.startswith("#")]
    gradio = [s.version for r in ui_pins if r.name == "gradio" for s in r.specifier if s.operator == "=="]
    assert gradio and _requirement(meta["optional-dependencies"]["ui"], "gradio").specifier.contains(gradio[0])


@pytest.mark.slow
def test_the_wheel_holds_what_the_installed_dbtrain_reads(tmp_path):
    """A non-editable install: the built-in model, the estimate's architectures, the attention configs and the
    CUDA sources for a JIT build must be inside the wheel (they are read beside the modules)."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info", "build")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("csrc", "dbkernels", "trainer", "bench"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "DBK_SKIP_CUDA_BUILD": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name, = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
        entry = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    for want in ("trainer/world/assets/tiny-world-sd/unet/config.json", "trainer/world/assets/tiny-world-sd/model_index.json",
                 "trainer/world/assets/tiny-world-judge/judge.safetensors", "trainer/memory/arch_configs/sdxl.json",
                 "dbkernels/ops/attention/curated_configs.json", "dbkernels/csrc/ops.cpp",
                 "dbkernels/csrc/common.cuh", "trainer/cli.py"):
        assert want in names, want
    tracked = {p.relative_to(ROOT / "trainer/world/assets").as_posix()
               for p in (ROOT / "trainer/world/assets").rglob("*") if p.is_file()}
    assert {"trainer/world/assets/" + t for t in tracked} <= names
    assert {f"dbkernels/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")} \
        <= names
    assert "dbtrain = trainer.cli:main" in entry
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("numpy") and "<2.4" in r for r in requires), requires
    assert any(r.startswith("torch") and "extra == \"train\"" in r for r in requires), requires


def test_install_page_is_linked():
    page = (ROOT / "docs" / "install.md").read_text()
    for part in ('pip install ".[train]"', f"torch=={cli.TORCH_PIN}", "--index-url https://download.pytorch.org/whl/cpu",
                 "bash bootstrap.sh", "dbtrain estimate --arch sd15"):
        assert part in page, part
    assert "install.md" in (ROOT / "mkdocs.yml").read_text()
    assert "docs/install.md" in (ROOT / "README.md").read_text()


# ----------------------------------------------------------------------------- 7: HEIC, panoramas, bootstrap

def test_heic_photos_say_how_to_convert_them(tmp_path, capsys):
    inst = photos(tmp_path / "inst", n=2)
    (inst / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (inst / "notes.md").write_text("x")
    assert [p.name for p in images.list_images(inst, "instance image")] == ["img0.png", "img1.png"]
    err = capsys.readouterr().err.splitlines()
    heic = [x for x in err if "IMG_0001.HEIC" in x]
    assert len(heic) == 1 and heic[0].startswith("dbtrain: warning:") and "heif-convert" in heic[0], err
    assert "HEIC" not in " ".join(x for x in err if "notes.md" in x)
    # only HEIC photos: the error says how to convert them
    only = tmp_path / "only"
    only.mkdir()
    (only / "a.heif").write_bytes(b"\x00")
    with pytest.raises(UserError, match="heif-convert") as e:
        images.list_images(only, "instance image")
    assert "\n" not in str(e.value)


def test_a_panorama_gets_a_note_saying_how_much_the_crop_keeps(tmp_path, capsys):
    folder = tmp_path / "inst"
    folder.mkdir()
    Image.new("RGB", (500, 20)).save(folder / "pano.png")      # 25:1
    Image.new("RGB", (20, 120)).save(folder / "tall.png")      # 1:6
    Image.new("RGB", (100, 20)).save(folder / "wide.png")      # 5:1: fine (a fifth of it per view)
    files = sorted(folder.iterdir())
    images.ImageSet(files, 16, center_crop=False, random_flip=False)
    images.ImageSet(files, 16, center_crop=False, random_flip=False)  # once per run
    notes = [x for x in capsys.readouterr().err.splitlines() if "pano.png" in x]
    assert len(notes) == 1 and notes[0].startswith("dbtrain: note:"), notes
    assert "25:1" in notes[0] and "4%" in notes[0] and "tall.png (1:6, 17%)" in notes[0], notes[0]
    assert "wide.png" not in notes[0] and "random" in notes[0]


def test_bootstrap_names_the_torch_build(tmp_path):
    """Before: "keeping torch 2.13.0+cpu (CUDA None (CPU build)"."""
    line = next(x for x in (ROOT / "bootstrap.sh").read_text().splitlines() if "keeping torch" in x)
    snippet = re.search(r"-c '([^']*)'", line).group(1)
    said = {}
    for version, cuda in (("2.13.0+cpu", None), ("2.13.0+cu128", "12.8")):
        fake = tmp_path / version
        fake.mkdir()
        (fake / "torch.py").write_text(f"__version__ = {version!r}\nclass version:\n    cuda = {cuda!r}\n")
        r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(fake)}, timeout=60)
        assert r.returncode == 0, r.stderr
        said[version] = r.stdout.strip()
    assert said == {"2.13.0+cpu": "2.13.0+cpu (CPU build)", "2.13.0+cu128": "2.13.0+cu128 (CUDA 12.8)"}
