"""`python -m bench peers` (issue 29): its refusals, the step clock both sides run under, the LoRA file
comparison and the report. The runs themselves need a diffusers checkout (bench/results/peers/ holds them)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench import peers, peers_report

REPO = Path(__file__).resolve().parent.parent


def _bench(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "bench", "peers", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_without_a_checkout_one_line_and_exit_2(tmp_path):
    r = _bench()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "--diffusers_examples DIR" in r.stderr
    (tmp_path / "dreambooth").mkdir()
    (tmp_path / "dreambooth" / "train_dreambooth.py").write_text("")
    r = _bench("--diffusers_examples", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "has no textual_inversion/textual_inversion.py, dreambooth/train_dreambooth_lora.py" in r.stderr


def test_the_step_clock_counts_every_optimizer_step_and_keeps_the_exit_code(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys, torch\n"
                      "w = torch.nn.Parameter(torch.ones(3))\n"
                      "opt = torch.optim.AdamW([w], lr=0.1)\n"
                      "for _ in range(7):\n"
                      "    (w ** 2).sum().backward(); opt.step(); opt.zero_grad()\n"
                      "sys.exit(int(sys.argv[1]))\n")
    times = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "bench.peer_run", "--times", str(times), "--", str(script), "3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    t = json.loads(times.read_text())["step_times"]
    assert len(t) == 7 and t == sorted(t)
    n, rate = peers.steps_per_second(times, skip=2)
    assert n == 7 and rate > 0


def test_lora_files_compared_across_namings(tmp_path):
    ours = {"unet.a.to_q.lora_A.weight": torch.zeros(4, 8), "unet.a.to_q.lora_B.weight": torch.zeros(8, 4),
            "unet.a.to_k.lora_A.weight": torch.zeros(4, 8), "unet.a.to_k.lora_B.weight": torch.zeros(8, 4)}
    theirs = {"unet.a.to_q.lora.down.weight": torch.zeros(4, 8), "unet.a.to_q.lora.up.weight": torch.zeros(8, 4),
              "unet.a.to_v.lora.down.weight": torch.zeros(2, 8), "unet.a.to_v.lora.up.weight": torch.zeros(8, 2)}
    for side, tensors in (("dbtrain", ours), ("diffusers", theirs)):
        (tmp_path / f"seed0-lora-{side}").mkdir()
        save_file(tensors, tmp_path / f"seed0-lora-{side}" / "pytorch_lora_weights.safetensors")
    assert peers._adapter_shapes(tmp_path / "seed0-lora-diffusers" / "pytorch_lora_weights.safetensors") == {
        "unet.a.to_q": ((4, 8), (8, 4)), "unet.a.to_v": ((2, 8), (8, 2))}

    class A:
        diffusers_examples, seeds, work = None, [0, 1], str(tmp_path)
    [row] = peers.adapters_part(A())
    assert row["only_dbtrain"] == ["unet.a.to_k"] and row["only_diffusers"] == ["unet.a.to_v"]
    assert row["shapes_differ"] == []
    assert row["update_norm"] == {"dbtrain": 0.0, "diffusers": 0.0}  # B = 0: nothing trained
    assert "only dbtrain: ['unet.a.to_k']" in peers_report.adapters_lines([row])[0]


def _train_row(method, side, seed, rate, dino):
    return {"part": "train", "method": method, "side": side, "seed": seed, "exit_code": 0, "steps_per_s": rate,
            "peak_rss_bytes": 2**30, "DINO": dino, "CLIP-I": 0.1, "CLIP-T": 0.5, "PRES": 0.0, "DIV": 0.9,
            "ci95": {"DINO": [dino - 0.01, dino + 0.01]}, "device": "cpu", "torch": "t", "diffusers": "d"}


def test_report_ratios_and_overlap(tmp_path):
    rows = [_train_row("ti", "dbtrain", 0, 10.0, 0.20), _train_row("ti", "diffusers", 0, 8.0, 0.205),
            _train_row("ti", "dbtrain", 1, 9.0, 0.30), _train_row("ti", "diffusers", 1, 10.0, 0.10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = peers_report.write_report(tmp_path)
    assert "| Textual Inversion | dbtrain | 9.50 | 0.90-1.25x | 1024 |" in text
    assert "| Textual Inversion | 0 | 0.200 [0.190, 0.210] | 0.205 [0.195, 0.215] | yes |" in text
    assert "| Textual Inversion | 1 | 0.300 [0.290, 0.310] | 0.100 [0.090, 0.110] | no |" in text
    assert (tmp_path / "peers.md").read_text() == text
