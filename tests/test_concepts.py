"""Several concepts in one run (--concepts FILE, issue 30): the file (JSON or TOML, the DreamBooth forks'
concepts_list), its one-line errors, and a two-concept run on a tiny model: class images generated per concept,
instance rows drawn by each concept's repeats, class rows of the instance row's concept, the record, and
`dbtrain eval` scoring each concept against its own pictures."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from tests.cli_helpers import one_line_error, run_cli
from trainer.errors import UserError
from trainer.options import concepts
from trainer.options.train import parse
from trainer.world.tiny_sd import build_tiny_sd

MODEL = ["--pretrained_model_name_or_path", "m"]


def _images(folder, n, color=(200, 60, 60), size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (size, size), tuple(min(255, c + 20 * k) for c in color)).save(folder / f"img{k}.png")
    return folder


def _subjects(root):
    """dog/ (3 pictures) and cat/ (2) in `root`."""
    return _images(root / "dog", 3), _images(root / "cat", 2, color=(60, 60, 200))


def _write(path, concepts_list):
    path.write_text(json.dumps(concepts_list))
    return path


TWO = [{"instance_data_dir": "dog", "instance_prompt": "a photo of [V] dog", "class_prompt": "a dog",
        "class_data_dir": "cls-dog", "num_class_images": 2},
       {"instance_data_dir": "cat", "instance_prompt": "a photo of [V] cat", "class_prompt": "a cat",
        "class_data_dir": "cls-cat", "repeats": 3, "identifier": "ohwx", "num_class_images": 1}]


def test_json_and_toml_files_give_the_same_concepts_paths_relative_to_the_file(tmp_path):
    _subjects(tmp_path)
    as_list = _write(tmp_path / "list.json", TWO)
    as_table = tmp_path / "table.json"
    as_table.write_text(json.dumps({"concepts": TWO}))
    toml = tmp_path / "c.toml"
    toml.write_text("".join(
        "[[concepts]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in c.items()) for c in TWO))
    found = [concepts.load(p) for p in (as_list, as_table, toml)]
    assert found[0] == found[1] == found[2]
    dog, cat = found[0]
    assert dog.instance_data_dir == str(tmp_path / "dog") and cat.class_data_dir == str(tmp_path / "cls-cat")
    assert (dog.name, dog.repeats, cat.repeats, cat.identifier, dog.identifier) == ("dog", 1, 3, "ohwx", None)
    # the options fill in what a concept leaves out; the one subject of the flags is one concept
    opts = parse(MODEL + ["--concepts", str(toml), "--identifier", "zwx", "--num_class_images", "7"])
    dog, cat = concepts.concepts_of(opts)
    assert (dog.identifier, cat.identifier, dog.num_class_images, cat.num_class_images) == ("zwx", "ohwx", 2, 1)
    one = parse(MODEL + ["--instance_data_dir", str(tmp_path / "dog"), "--instance_prompt", "a [V] dog"])
    (only,) = concepts.concepts_of(one)
    assert (only.instance_data_dir, only.instance_prompt, only.repeats, only.name) == (
        str(tmp_path / "dog"), "a [V] dog", 1, "dog")
    # the epoch's images: each concept's images x its repeats (3 x 1 + 2 x 3)
    assert concepts.instance_count(opts) == 9 and concepts.class_count(opts) == 3


BAD = [  # (file text or None: TWO as JSON, extra flags, what the one line says)
    ('[{"instance_data_dir": "dog",}]', [], "not valid JSON: Expecting property name enclosed in double quotes at "
                                            "line 1, column 30"),
    ('[[concepts]]\ninstance_data_dir = "dog" x\n', [], "not valid TOML: Expected newline or end of document after "
                                                       "a statement (at line 2, column 27)"),
    ('{"a": 1}', [], 'expected a list of concepts (or a table with a "concepts" list)'),
    ("[]", [], "holds no concepts"),
    ('["dog"]', [], "concept 1 is a str, not a table"),
    ('[{"instance_prompt": "a [V] dog"}]', [], "concept 1 has no instance_data_dir"),
    ('[{"instance_data_dir": "dog"}]', [], "concept 1 has no instance_prompt"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog"}, {"instance_data_dir": "bird", '
     '"instance_prompt": "a [V] bird"}]', [], "concept 2 (bird): instance_data_dir"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog", "repeats": 0}]', [],
     "concept 1 (dog): repeats must be >= 1, got 0"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog", "repeats": 1.5}]', [],
     "concept 1: repeats must be a whole number, got 1.5"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog", "repeat": 2}]', [],
     "concept 1 has unknown key(s) repeat"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog"}]', ["--with_prior_preservation"],
     "concept 1 (dog): --with_prior_preservation needs class_prompt"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog", "class_prompt": "a dog"}]',
     ["--with_prior_preservation"], "concept 1 (dog): --with_prior_preservation needs class_data_dir"),
    (json.dumps([{**TWO[0], "class_data_dir": "c"}, {**TWO[1], "class_data_dir": "c"}]), ["--with_prior_preservation"],
     "concepts 1 and 2 share the class_data_dir"),
    (json.dumps([{**TWO[0], "class_data_dir": "cat"}, TWO[1]]), ["--with_prior_preservation"],
     "concept 1 (dog): class_data_dir"),  # another concept's pictures
    ('[{"instance_data_dir": "dog", "instance_prompt": "a photo of zwx dog"}]', [],
     "concept 1 (dog): instance_prompt 'a photo of zwx dog' names neither [V] nor sks"),
    ('[{"instance_data_dir": "dog", "instance_prompt": "a [V] dog", "mask_dir": "masks"}]', [],
     "concept 1 (dog): mask_dir"),
    (None, ["--instance_data_dir", "dog"], "give either --concepts or --instance_data_dir"),
    (None, ["--train_text_embedding"], "--train_text_embedding with --concepts is not supported"),
]


@pytest.mark.parametrize("text,flags,said", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_concepts_are_one_line(tmp_path, monkeypatch, text, flags, said):
    monkeypatch.chdir(tmp_path)
    _subjects(tmp_path)
    path = tmp_path / ("c.toml" if text and text.startswith("[[") else "c.json")
    path.write_text(text) if text is not None else _write(path, TWO)
    with pytest.raises(UserError) as e:
        parse(MODEL + ["--concepts", str(path)] + flags)
    assert said in str(e.value) and "\n" not in str(e.value)


def test_concepts_missing_file_and_textual_inversion(tmp_path, capsys):
    code, _, err = run_cli(["train"] + MODEL + ["--concepts", str(tmp_path / "none.json")], capsys)
    one_line_error(code, err, f"--concepts {tmp_path / 'none.json'}: no such file")
    opts = parse(MODEL + ["--instance_data_dir", "d", "--instance_prompt", "a [V] dog"])
    opts.data.concepts, opts.data.instance_data_dir, opts.data.instance_prompt = "c.json", None, None
    opts.method = "textual_inversion"
    with pytest.raises(UserError, match="textual-inversion .* does not take --concepts"):
        concepts.check(opts)


def test_auto_identifiers_of_concepts_differ(tiny_model):
    from transformers import CLIPTokenizer

    from trainer.core.prompts import pick_identifier

    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    first = pick_identifier(tok, "dog", 0)
    assert pick_identifier(tok, "cat", 0, exclude=[first]) != first


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def test_concepts_sharing_a_class_folder_share_its_images(tiny_model, tmp_path):
    """One pipeline; the folder filled once, to the larger count (no second set of the same seeds)."""
    from trainer.core.class_images import generate_per_concept

    _subjects(tmp_path)
    shared = [{**TWO[0], "class_data_dir": "shared", "num_class_images": 1},
              {**TWO[1], "class_prompt": "a dog", "class_data_dir": "shared", "num_class_images": 2}]
    opts = parse(MODEL + ["--concepts", str(_write(tmp_path / "c.json", shared)), "--with_prior_preservation",
                          "--class_inference_steps", "1", "--resolution", "32"])
    opts.model.pretrained_model_name_or_path = str(tiny_model)
    options = [concepts.options_of(opts, c) for c in concepts.concepts_of(opts)]
    assert generate_per_concept(options, torch.device("cpu"), torch.float32) == [2, 0]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["class-00000.png", "class-00001.png"]


@pytest.fixture(scope="module")
def two_concept_run(tiny_model, tmp_path_factory):
    """A 1-step run of dog (3 pictures) and cat (2 pictures, repeats 3, one with a caption file) with prior
    preservation; the Batches it made and what `dbtrain train` printed."""
    from trainer import cli
    from trainer.core import loop

    root = tmp_path_factory.mktemp("two")
    _subjects(root)
    (root / "cat" / "img0.txt").write_text("a [V] cat on a sofa\n")  # (cat's captions; dog has none)
    made = []

    class Recorded(loop.Batches):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append((self, kw))

    argv = ["train", "--pretrained_model_name_or_path", str(tiny_model),
            "--concepts", str(_write(root / "c.json", [TWO[0], {**TWO[1], "caption_extension": ".txt"}])),
            "--output_dir", str(root / "out"), "--resolution", "32", "--max_train_steps", "1", "--optimizer", "adamw",
            "--kernels", "off", "--with_prior_preservation", "--class_inference_steps", "1", "--sample_batch_size", "2"]
    mp = pytest.MonkeyPatch()
    mp.setattr(loop, "Batches", Recorded)
    import contextlib
    import io

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0
    finally:
        mp.undo()
    return root, made[0], out.getvalue()


def test_two_concepts_train_with_their_own_class_images_prompts_and_weights(two_concept_run):
    root, (batches, kw), printed = two_concept_run
    assert ("concepts: 2 (dog: 3 images x repeats 1, 2 class images; cat: 2 images x repeats 3, 1 class images)"
            in printed)
    assert sorted(p.name for p in (root / "cls-dog").glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert sorted(p.name for p in (root / "cls-cat").glob("*.png")) == ["class-00000.png"]
    assert batches.inst_prompts == ["a photo of sks dog"] * 3 + ["a ohwx cat on a sofa", "a photo of ohwx cat"]
    assert batches.cls_prompts == ["a dog", "a dog", "a cat"]
    assert kw["inst_concepts"] == [0, 0, 0, 1, 1] and kw["cls_concepts"] == [0, 0, 1]
    assert kw["inst_weights"] == [1.0, 1.0, 1.0, 3.0, 3.0]
    # the draws: cat's rows 2 x 3 of 9 (uniform would be 2 of 5), each class row of its instance row's concept
    seen = []
    real_prompt = batches.prompt
    batches.prompt = lambda which, i: (seen.append((which, i)), real_prompt(which, i))[1]
    pairs = []
    for step in range(300):
        seen.clear()
        batches.make(step, 0)
        (_, i), (_, j) = seen
        pairs.append((("dog", "cat")[kw["inst_concepts"][i]], batches.cls_prompts[j].split()[-1]))  # (class nouns)
    cat = sum(c == "cat" for c, _ in pairs) / len(pairs)
    assert abs(cat - 6 / 9) < 0.1, cat
    assert all(c == d for c, d in pairs), Counter(pairs)


def test_the_record_and_eval_are_per_concept(two_concept_run, capsys):
    root, _, _ = two_concept_run
    rec = json.loads((root / "out" / "dreambooth.json").read_text())
    assert (rec["identifier"], rec["class_noun"]) == ("sks", "dog")  # (the first concept's, for sample & co.)
    assert [(c["name"], c["identifier"], c["class_noun"], c["instance_data_dir"], c["repeats"])
            for c in rec["concepts"]] == [("dog", "sks", "dog", str(root / "dog"), 1),
                                          ("cat", "ohwx", "cat", str(root / "cat"), 3)]
    from trainer.options.sampling import EvalOptions
    from trainer.world import evaluate

    quick = dict(model=str(root / "out"), num_images=2, steps=1, prompts=["a {V} {C} in space"], device="cpu")
    a = EvalOptions(instance_data_dir=None, out=str(root / "eval"), **quick)
    evaluate.check(a)
    metrics = evaluate.run(a)
    assert set(metrics) == {"dog", "cat"}
    table = capsys.readouterr().out
    assert f"| {root / 'out'} [dog] |" in table and f"| {root / 'out'} [cat] |" in table
    doc = json.loads((root / "eval" / "metrics.json").read_text())
    assert [(c["name"], c["identifier"], c["prompts"]) for c in doc["concepts"]] == [
        ("dog", "sks", ["a sks dog in space", "a dog"]), ("cat", "ohwx", ["a ohwx cat in space", "a cat"])]
    # one concept: by its folder (the CLI); a folder of none of them is one line
    code, out, _ = run_cli(["eval", "--model", str(root / "out"), "--instance_data_dir", str(root / "cat"),
                            "--num_images", "2", "--steps", "1", "--prompts", "a {V} {C}", "--device", "cpu"], capsys)
    assert code == 0 and "[cat]" in out and "[dog]" not in out
    code, _, err = run_cli(["eval", "--model", str(root / "out"), "--instance_data_dir", str(root)], capsys)
    one_line_error(code, err, "is none of", "dog: ", "cat: ")
