"""Issue 33, the writing side: temporaries per process (two runs in one folder never remove each other's),
`dbtrain export` into a full disk, folders checked writable before a model loads, and files with the
user's normal permissions (umask), weights and configs alike."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cli_helpers import add_random_lora, one_line_error, run_cli
from trainer.formats import diffusers_folder, io, outdir
from trainer.world.tiny_sd import build_tiny_sd


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and a diffusers-format LoRA for it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("writing")
    model = build_tiny_sd(root / "model")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    torch.manual_seed(0)
    ucfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    tcfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights="gaussian")
    add_random_lora(pipe.unet, [pipe.text_encoder], ucfg, tcfg)
    StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    return SimpleNamespace(model=model, lora=root / "lora" / "pytorch_lora_weights.safetensors")


@pytest.fixture
def pids():
    """(a pid whose process is gone, the pid of a live process that is not this one)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen(["sleep", "60"])
    yield SimpleNamespace(dead=done.pid, live=live.pid)
    live.kill()
    live.wait()


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only (0555); as root, whom the bits do not stop, os.access says so as for a user."""
    marked: set[Path] = set()
    real = os.access

    def access(path, mode, *a, **k):
        if mode & os.W_OK and Path(path).resolve() in marked:
            return False
        return real(path, mode, *a, **k)

    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", access)

    def mark(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o555)
        marked.add(folder.resolve())
        return folder

    yield mark
    for f in marked:
        os.chmod(f, 0o755)


@pytest.fixture
def no_model_loading(monkeypatch):
    import diffusers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the paths were checked")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.StableDiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.fixture
def umask():
    """Set the process's umask for one test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in sorted(folder.rglob("*"))
            if not p.is_symlink()}


def no_space(*a, **k):
    """safetensors' save_file on a full disk: a part of the file written, then its error (not an OSError)."""
    from safetensors import SafetensorError

    Path(a[1] if len(a) > 1 else k["filename"]).write_bytes(b"\0" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def inst_folder(tmp_path: Path) -> Path:
    inst = tmp_path / "inst"
    inst.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32), (40 * k, 90, 200)).save(inst / f"{k}.png")
    return inst


def train_argv(model, inst, out, *extra):
    return ["train", "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(inst),
            "--instance_prompt", "a photo of [V] toy", "--output_dir", str(out), "--resolution", "32",
            "--max_train_steps", "2", "--optimizer", "adamw", "--kernels", "off", *extra]


# ------------------------------------------------------------------ 1: temporaries per process

def test_staging_folders_are_per_process_and_only_stale_ones_are_removed(tmp_path, pids):
    """The staging folder was `.tmp-export` for every process: two runs removed each other's."""
    out = tmp_path / "out"
    other = out / f".tmp-export-{pids.live}"  # a live run's staging folder, mid-export
    (other / "unet").mkdir(parents=True)
    dead = out / f".tmp-export-{pids.dead}"
    dead.mkdir()
    legacy = out / ".tmp-export"
    legacy.mkdir()
    mine = diffusers_folder.staging(out)
    assert mine.name == f".tmp-export-{os.getpid()}"
    assert (other / "unet").is_dir()
    assert not dead.exists() and not legacy.exists()
    mine.mkdir()
    (mine / "model_index.json").write_text("{}")
    outdir.write_marker(out, exported=[])
    diffusers_folder.install(out, mine)
    assert (out / "model_index.json").is_file() and not mine.exists() and (other / "unet").is_dir()


def test_the_next_run_cleans_what_gone_processes_left(tmp_path, pids):
    out = tmp_path / "out"
    out.mkdir()
    for pid in (pids.dead, pids.live):
        (out / f".tmp-export-{pid}").mkdir()
    (out / f".tmp-old-{pids.dead}-unet").mkdir()  # killed between moving unet aside and the new one in
    (out / f".tmp-old-{pids.dead}-vae").mkdir()  # ... and after the new one moved in
    (out / "vae").mkdir()
    (out / f".tmp-old-{pids.live}-text_encoder").mkdir()  # a live run's, mid-install
    diffusers_folder.remove_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f".tmp-export-{pids.live}", f".tmp-old-{pids.live}-text_encoder", "unet", "vae"])


def test_a_new_file_cleans_its_stale_temporaries_and_keeps_a_live_writers(tmp_path, pids):
    target = tmp_path / "model.safetensors"
    dead, live = tmp_path / f".model.safetensors.tmp-{pids.dead}", tmp_path / f".model.safetensors.tmp-{pids.live}"
    dead.write_bytes(b"half a file")
    live.mkdir()
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's")
    io.write_new_safetensors(target, {"w": torch.ones(3)})
    assert not dead.exists() and live.is_dir() and mine.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "mine.txt", "model.safetensors"])


def test_class_image_temporaries_of_a_killed_run_are_removed(tmp_path, pids):
    from trainer.core import class_images

    folder = tmp_path / "class"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"class-{k:05d}.png")
    (folder / f".class-00002.png.tmp-{pids.dead}").write_bytes(b"x")
    (folder / ".class-00003.png.tmp").write_bytes(b"x")  # named before temporaries had a pid
    (folder / f".class-00004.png.tmp-{pids.live}").write_bytes(b"x")
    opts = SimpleNamespace(prior=SimpleNamespace(class_data_dir=str(folder), num_class_images=2),
                           data=SimpleNamespace(caption_extension=None))
    assert class_images.generate_class_images(opts, torch.device("cpu"), torch.float32) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f".class-00004.png.tmp-{pids.live}", "class-00000.png",
                                                        "class-00001.png"]


def test_merged_folder_temporaries_are_per_process(tiny, tmp_path, capsys, pids):
    live = tmp_path / f".merged.tmp-export-{pids.live}"
    live.mkdir()
    dead = tmp_path / f".merged.tmp-export-{pids.dead}"
    dead.mkdir()
    code, _, err = run_cli(["export", "--model", str(tiny.model), "--lora", str(tiny.lora), "--merge",
                            "--output_dir", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "merged"]


# ------------------------------------------------------------------ 4: export into a full disk

def test_export_single_file_into_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """Was: `SafetensorError ... No space left on device` traceback, exit 1."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(["export", "--model", str(tiny.model), "--single_file", str(out / "m.safetensors")],
                           capsys)
    one_line_error(code, err, "could not write m.safetensors", "No space left on device", "needs about", "free")
    assert list(out.iterdir()) == []


def test_export_kohya_write_error_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def fail(*a, **k):
        Path(a[1]).write_bytes(b"\0")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    code, _, err = run_cli(["export", "--lora", str(tiny.lora), "--kohya", str(tmp_path / "k.safetensors")], capsys)
    one_line_error(code, err, "could not write k.safetensors", os.strerror(errno.EIO), "needs about")
    assert list(tmp_path.iterdir()) == []


def test_export_merged_folder_into_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys,
                                                                            monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli(["export", "--model", str(tiny.model), "--lora", str(tiny.lora), "--merge",
                            "--output_dir", str(out / "merged")], capsys)
    one_line_error(code, err, "could not write --output_dir merged", "No space left on device", "needs about")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("what", ["single_file", "output_dir", "kohya"])
def test_export_checks_free_space_before_loading_a_model(tiny, tmp_path, capsys, monkeypatch, no_model_loading,
                                                         what):
    monkeypatch.setattr(outdir, "free_bytes", lambda folder: 1000)
    argv = {"single_file": ["--model", str(tiny.model), "--single_file", str(tmp_path / "m.safetensors")],
            "output_dir": ["--model", str(tiny.model), "--lora", str(tiny.lora), "--merge", "--output_dir",
                           str(tmp_path / "merged")],
            "kohya": ["--lora", str(tiny.lora), "--kohya", str(tmp_path / "k.safetensors")]}[what]
    code, _, err = run_cli(["export", *argv], capsys)
    one_line_error(code, err, "not enough free space", f"--{what}", "needs about", "0.0 MB free")
    assert list(tmp_path.iterdir()) == []


def test_the_single_file_estimate_is_the_weights_size(tiny):
    """float32: 4 bytes per element of unet, vae and text_encoder; --half: 2."""
    from trainer.commands.export import _model_numel

    from safetensors.torch import load_file

    n = sum(t.numel() for comp in ("unet", "vae", "text_encoder")
            for f in (tiny.model / comp).glob("*.safetensors") for t in load_file(str(f)).values())
    assert _model_numel(tiny.model) == n


# ------------------------------------------------------------------ 8: folders checked writable first

def test_a_read_only_class_folder_with_too_few_images_is_refused_before_the_model_loads(tiny, tmp_path, capsys,
                                                                                       read_only, no_model_loading):
    """Was: class images generated for minutes, then `OSError: [Errno 30] Read-only file system`."""
    cls = tmp_path / "class"
    cls.mkdir()
    Image.new("RGB", (32, 32)).save(cls / "a.png")
    read_only(cls)
    argv = train_argv(tiny.model, inst_folder(tmp_path), tmp_path / "out", "--with_prior_preservation",
                      "--class_data_dir", str(cls), "--class_prompt", "a toy", "--num_class_images", "3")
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, f"--class_data_dir {cls} is not writable", "2 class image(s) must be generated",
                   "holds 1 of --num_class_images 3")
    assert not (tmp_path / "out").exists()


def test_a_read_only_class_folder_that_holds_enough_images_is_fine(tiny, tmp_path, read_only):
    from trainer.core import inputs
    from trainer.options import train as train_options

    cls = tmp_path / "class"
    cls.mkdir()
    for k in range(2):
        Image.new("RGB", (32, 32)).save(cls / f"{k}.jpg")
    (cls / ".hidden.png").write_bytes(b"")  # not counted, as list_images skips it
    read_only(cls)
    opts = train_options.parse(train_argv(tiny.model, inst_folder(tmp_path), tmp_path / "out",
                                          "--with_prior_preservation", "--class_data_dir", str(cls),
                                          "--class_prompt", "a toy", "--num_class_images", "2")[1:])
    inputs.check_paths(opts)
    assert inputs.class_images_to_generate(opts) == 0
    opts.prior.num_class_images = 5
    assert inputs.class_images_to_generate(opts) == 3


@pytest.mark.parametrize("where", ["logging_dir", "validation"])
def test_read_only_logging_and_validation_folders_are_refused_first(tiny, tmp_path, capsys, read_only,
                                                                    no_model_loading, where):
    out = tmp_path / "out"
    if where == "validation":  # output_dir/validation: a run of ours stopped before its first checkpoint
        outdir.claim(out, {})
        folder = read_only(out / "validation")
        extra = ["--validation_prompt", "a [V] toy"]
    else:  # an absolute --logging_dir is used as given
        folder = read_only(tmp_path / "logs")
        extra = ["--logging_dir", str(folder)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run_cli(train_argv(tiny.model, inst_folder(tmp_path), out, *extra), capsys)
    one_line_error(code, err, f"{folder} is not writable")
    assert sorted(p.name for p in tmp_path.rglob("*") if "inst" not in p.parts) == before


# ------------------------------------------------------------------ 9: the user's normal permissions

@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_new_safetensors_files_get_the_umask_permissions(tmp_path, umask, mask):
    """safetensors writes 0600 whatever the umask: weights unreadable to the others configs are readable by."""
    umask(mask)
    io.write_new_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)})
    assert modes(tmp_path) == {"w.safetensors": 0o666 & ~mask}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_normal_permissions_of_a_tree(tmp_path, umask, mask):
    umask(mask)
    tree = tmp_path / "t"
    (tree / "unet").mkdir(parents=True)
    (tree / "unet" / "w.safetensors").write_bytes(b"")
    os.chmod(tree / "unet" / "w.safetensors", 0o600)
    (tree / "config.json").write_text("{}")
    os.chmod(tree / "config.json", 0o644)
    os.chmod(tree / "unet", 0o700)
    elsewhere = tmp_path / "elsewhere"  # a link in the tree: what it points to is not ours to change
    elsewhere.write_text("x")
    os.chmod(elsewhere, 0o600)
    (tree / "link").symlink_to(elsewhere)
    io.normal_permissions(tree)
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
    assert modes(tree) == {"config.json": 0o666 & ~mask, "unet": 0o777 & ~mask,
                           "unet/w.safetensors": 0o666 & ~mask}
    assert io.umask() == mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_an_exported_run_folder_has_normal_permissions(tmp_path, umask, mask):
    """What train's export and LoRA saving write goes through the staging folder's install."""
    from safetensors.torch import save_file

    umask(mask)
    out = tmp_path / "out"
    outdir.claim(out, {})
    tmp = diffusers_folder.staging(out)
    (tmp / "unet").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp / "unet" / "config.json").write_text("{}")
    diffusers_folder.install(out, tmp)
    got = modes(out / "unet")
    assert got == {"config.json": 0o666 & ~mask, "diffusion_pytorch_model.safetensors": 0o666 & ~mask}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_export_outputs_have_normal_permissions(tiny, tmp_path, capsys, umask, mask):
    umask(mask)
    single, merged, kohya = tmp_path / "m.safetensors", tmp_path / "merged", tmp_path / "k.safetensors"
    code, _, err = run_cli(["export", "--model", str(tiny.model), "--lora", str(tiny.lora), "--merge",
                            "--single_file", str(single), "--output_dir", str(merged)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["export", "--lora", str(tiny.lora), "--kohya", str(kohya)], capsys)
    assert code == 0, err
    got = modes(tmp_path)
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    assert {k: v for k, v in got.items() if (tmp_path / k).is_file()} == dict.fromkeys(
        [k for k in got if (tmp_path / k).is_file()], want_file)
    assert {k: v for k, v in got.items() if (tmp_path / k).is_dir()} == dict.fromkeys(
        [k for k in got if (tmp_path / k).is_dir()], want_dir)
    assert "merged/unet/diffusion_pytorch_model.safetensors" in got and "k.safetensors" in got


def test_fabric_into_a_full_disk_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """(Was a traceback from PIL's save.)"""
    liked = tmp_path / "liked.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(liked)

    def full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = run_cli(["fabric", "--model", str(tiny.model), "--prompt", "a toy", "--liked", str(liked),
                            "--num_images", "1", "--steps", "1", "--out", str(tmp_path / "out"), "--device", "cpu"],
                           capsys)
    one_line_error(code, err, f"could not write the images in {tmp_path / 'out'}", os.strerror(errno.ENOSPC),
                   "needs about")


def test_another_ranks_write_probe_does_not_make_the_folder_foreign(tmp_path):
    """torchrun: rank 0 probes --output_dir with a temporary file while rank 1 checks that the folder is empty
    (seen in CI: 'holds files dbtrain did not write (.dbtrain-probe-...)')."""
    from trainer.formats import outdir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"{outdir.PROBE}abc123").write_text("")
    assert outdir.check_output_dir(tmp_path / "out", resume=False) == "empty"
    (tmp_path / "out" / "mine.txt").write_text("x")
    with pytest.raises(Exception, match="holds files dbtrain did not write"):
        outdir.check_output_dir(tmp_path / "out", resume=False)
