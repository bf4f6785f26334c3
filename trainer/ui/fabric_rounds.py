"""A FABRIC session of the FABRIC page: rounds of `dbtrain fabric`, each steered by every like and dislike
given so far (as `dbtrain fabric --liked ... --disliked ...` weighs them), in one folder of the app:
RUNS/fabric-.../round-N/000.png ..., the feedback in session.json. Each round draws new seeds (round r, image k:
seed + (r - 1) * num_images + k, the numbering of `dbtrain fabric --rounds`). No Gradio here."""
from __future__ import annotations

from pathlib import Path

from trainer.ui import runs

SESSION_FILE = "session.json"
MAX_IMAGES = 8  # images per round the page has places for
VERDICTS = ("liked", "disliked")


def new_session(root: Path, *, model: str, prompt: str, negative: str, num_images: int, steps: int, seed: int,
                device: str) -> dict:
    folder = runs.new_folder(root, "fabric")
    s = {"folder": str(folder), "model": model, "prompt": prompt, "negative": negative,
         "num_images": int(num_images), "steps": int(steps), "seed": int(seed), "device": device, "rounds": [],
         "verdicts": {}}
    save(s)
    return s


def save(s: dict) -> None:
    runs.write_json(Path(s["folder"]) / SESSION_FILE, s)


def feedback(s: dict, verdict: str) -> list[str]:
    """The images given `verdict`, in the order they were shown."""
    return [p for r in s["rounds"] for p in r["images"] if s["verdicts"].get(p) == verdict]


def next_round_argv(s: dict) -> list[str]:
    """`dbtrain fabric` for the next round, with every like and dislike so far."""
    r, n = len(s["rounds"]) + 1, s["num_images"]
    argv = ["fabric", "--model", s["model"], "--prompt", s["prompt"], "--num_images", str(n),
            "--steps", str(s["steps"]), "--seed", str(s["seed"] + (r - 1) * n),
            "--out", str(Path(s["folder"]) / f"round-{r}")]
    if s["negative"]:
        argv += ["--negative_prompt", s["negative"]]
    if s["device"] != "auto":
        argv += ["--device", s["device"]]
    liked, disliked = feedback(s, "liked"), feedback(s, "disliked")
    if liked:
        argv += ["--liked", *liked]
    if disliked:
        argv += ["--disliked", *disliked]
    return argv


def add_round(s: dict, argv: list[str]) -> dict:
    """Record the round `argv` wrote (its images, in order)."""
    out = Path(argv[argv.index("--out") + 1])
    images = [str(p) for p in runs.images_in(out) if p.name != "grid.png"]
    s["rounds"].append({"round": len(s["rounds"]) + 1, "images": images, "argv": argv,
                        "liked": len(feedback(s, "liked")), "disliked": len(feedback(s, "disliked"))})
    save(s)
    return s


def give(s: dict, k: int, verdict: str) -> dict:
    """Like or dislike image k of the last round; the same verdict again takes it back."""
    if not s.get("rounds") or k >= len(s["rounds"][-1]["images"]):
        return s
    path = s["rounds"][-1]["images"][k]
    if s["verdicts"].get(path) == verdict:
        s["verdicts"].pop(path)
    else:
        s["verdicts"][path] = verdict
    save(s)
    return s


def liked_copies(s: dict) -> list[str]:
    """The liked images as files to download, named by round (SESSION/liked/round-R-NNN.png): copies kept in step
    with the likes (a like taken back removes its copy; the round folders are never touched)."""
    import shutil

    folder = Path(s["folder"]) / "liked"
    want = {}
    for r in s["rounds"]:
        for p in r["images"]:
            if s["verdicts"].get(p) == "liked":
                want[folder / f"round-{r['round']}-{Path(p).name}"] = Path(p)
    folder.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f not in want:
            f.unlink(missing_ok=True)
    for dest, src in want.items():
        if not dest.exists():
            shutil.copyfile(src, dest)
    return [str(p) for p in want]


def earlier(s: dict) -> list[tuple[str, str]]:
    """(image, caption) of every round before the last, with its verdict."""
    out = []
    for r in s["rounds"][:-1]:
        for k, p in enumerate(r["images"]):
            v = s["verdicts"].get(p)
            out.append((p, f"round {r['round']} #{k + 1}" + (f": {v}" if v else "")))
    return out
