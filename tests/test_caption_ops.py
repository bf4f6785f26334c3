"""Caption dropout and shuffling (trainer.core.captions) and the draws of several concepts in Batches: weighted
instance draws and class rows paired to their instance row's concept; every draw from the step's generator."""
from __future__ import annotations

import pytest
import torch

from test_buckets import (BUCKETS, _fresh_notes, _one_thread, batches, comps, image_set, opts,  # noqa: F401
                          record_draws, write_images)
from trainer.core import captions
from trainer.core.captions import CaptionOps

CAPTION = "a photo of sks star, red, big, on grass, at noon"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shuffle_keeps_the_first_parts_and_permutes_the_rest():
    parts = [p.strip() for p in CAPTION.split(",")]
    outs = set()
    for seed in range(40):
        out = captions.shuffle(CAPTION, 1, gen(seed))
        got = out.split(", ")
        assert got[0] == parts[0] and sorted(got[1:]) == sorted(parts[1:])
        assert out == captions.shuffle(CAPTION, 1, gen(seed))  # the generator decides
        outs.add(out)
    assert len(outs) > 10  # 4! = 24 orders of the rest
    assert all(captions.shuffle(CAPTION, 2, gen(s)).startswith("a photo of sks star, red, ") for s in range(10))
    assert captions.shuffle(" one part ", 0, gen(0)) == "one part"
    g = gen(3)
    state = g.get_state()
    captions.shuffle("a, b", 1, g)  # one part left to shuffle: no draw
    assert torch.equal(g.get_state(), state)


def test_caption_dropout_rate_and_no_draw_when_off():
    ops = CaptionOps(dropout=0.3)
    g = gen(0)
    dropped = sum(ops(CAPTION, g) == "" for _ in range(4000)) / 4000
    assert dropped == pytest.approx(0.3, abs=0.03)
    off = CaptionOps()
    g = gen(1)
    state = g.get_state()
    assert off(CAPTION, g) == CAPTION and torch.equal(g.get_state(), state) and not off.active
    both = CaptionOps(dropout=0.5, shuffle_parts=True, keep=1)
    outs = [both(CAPTION, gen(s)) for s in range(30)]
    assert "" in outs and any(o not in ("", CAPTION) for o in outs)


def test_batches_drop_and_shuffle_captions_per_row_and_step(comps, tmp_path):  # noqa: F811
    """Instance and class rows; the empty prompt is cached with the others; the same (step, micro) gives the
    same prompts and embeddings in a fresh Batches (a resumed run)."""
    inst = write_images(tmp_path / "inst", [(64, 64), (64, 64)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)])
    cfg = opts(inst, "--caption_dropout", "0.4", "--train_batch_size", "3")
    prompts = {"inst": "a photo of sks star, red, shiny", "cls": "a photo of star"}

    def make():
        b = batches(cfg, comps, image_set(inst, cfg), image_set(cls_dir, cfg),
                    inst_prompts=[prompts["inst"]] * 2, cls_prompts=[prompts["cls"]])
        seen = []

        class Recorded(CaptionOps):
            def __call__(self, text, g):
                seen.append(super().__call__(text, g))
                return seen[-1]

        b.captions = Recorded(b.captions.dropout, b.captions.shuffle_parts, b.captions.keep)
        return b, seen

    b, seen = make()
    assert set(b.embeds) == {prompts["inst"], prompts["cls"], ""}
    runs = []
    for step in range(6):
        seen.clear()
        batch = b.make(step, 0)
        assert len(seen) == 6
        for row, text in enumerate(seen):
            assert text in (prompts["inst"] if row < 3 else prompts["cls"], "")
            assert torch.equal(batch.embeds[row:row + 1], b.embeds[text][0])
        runs.append((list(seen), batch.embeds.clone()))
    assert any("" in s for s, _ in runs) and any(s[0] != "" for s, _ in runs)
    again, seen2 = make()
    for step in (3, 5):
        seen2.clear()
        batch = again.make(step, 0)
        assert seen2 == runs[step][0] and torch.equal(batch.embeds, runs[step][1])
    # shuffled captions of a frozen text side: encoded as drawn (without a gradient), the first part in front
    cfg = opts(inst, "--shuffle_caption", "--keep_tokens", "1", "--train_batch_size", "2")
    b = batches(cfg, comps, image_set(inst, cfg), inst_prompts=[prompts["inst"]] * 2)
    orders = set()
    for step in range(8):
        batch = b.make(step, 0)
        assert not batch.embeds.requires_grad
        orders.add(batch.embeds[0].sum().item())
    assert len(orders) > 1


def test_concepts_weight_instance_draws_and_pair_class_rows(comps, tmp_path, monkeypatch):  # noqa: F811
    """Concept 0: img0, img1; concept 1: img2 (weight 3x: its repeats). Class images 0, 3 of concept 0, 1, 2 of
    concept 1: each class row is drawn among its instance row's concept's class images."""
    inst = write_images(tmp_path / "inst", [(64, 64), (64, 64), (64, 64)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)] * 4)
    cfg = opts(inst, "--train_batch_size", "4")
    s, c = image_set(inst, cfg), image_set(cls_dir, cfg)
    b = batches(cfg, comps, s, c, inst_concepts=[0, 0, 1], cls_concepts=[0, 1, 1, 0], inst_weights=[1, 1, 6])
    log = []
    record_draws(monkeypatch, s, log, "inst")
    record_draws(monkeypatch, c, log, "cls")
    count = [0, 0, 0]
    concept_of_cls = {0: 0, 3: 0, 1: 1, 2: 1}
    for step in range(30):
        log.clear()
        b.make(step, 0)
        rows = [i for w, i, *_ in log if w == "inst"]
        cls_rows = [i for w, i, *_ in log if w == "cls"]
        assert len(rows) == len(cls_rows) == 4
        for i, k in zip(rows, cls_rows):
            assert concept_of_cls[k] == (0 if i < 2 else 1), (step, rows, cls_rows)
            count[i] += 1
    assert count[2] / sum(count) == pytest.approx(0.75, abs=0.1)  # weight 6 of 8
    # a zero weight never draws that image
    b = batches(cfg, comps, s, c, inst_concepts=[0, 0, 1], cls_concepts=[0, 1, 1, 0], inst_weights=[0, 1, 0])
    log.clear()
    for step in range(5):
        b.make(step, 0)
    assert {i for w, i, *_ in log if w == "inst"} == {1}
    # one concept, equal weights: exactly the draws of a run without concepts
    plain = batches(cfg, comps, s, c)
    same = batches(cfg, comps, s, c, inst_concepts=[0, 0, 0], cls_concepts=[0] * 4, inst_weights=[2, 2, 2])
    for step in range(3):
        assert torch.equal(plain.make(step, 0).latents, same.make(step, 0).latents)


def test_concepts_with_buckets_pair_by_concept_and_bucket(comps, tmp_path, monkeypatch):  # noqa: F811
    inst = write_images(tmp_path / "inst", [(64, 64), (100, 60), (64, 64), (100, 60)])
    cls_dir = write_images(tmp_path / "cls", [(64, 64)] * 2)
    cfg = opts(inst, "--train_batch_size", "2", "--aspect_ratio_buckets", BUCKETS)
    s, c = image_set(inst, cfg), image_set(cls_dir, cfg)
    b = batches(cfg, comps, s, c, inst_concepts=[0, 0, 1, 1], cls_concepts=[0, 1], inst_weights=[1, 1, 1, 1])
    log = []
    record_draws(monkeypatch, s, log, "inst")
    record_draws(monkeypatch, c, log, "cls")
    for step in range(12):
        log.clear()
        b.make(step, 0)
        inst_rows = [(i, size) for w, i, size, *_ in log if w == "inst"]
        cls_rows = [(i, size) for w, i, size, *_ in log if w == "cls"]
        assert len({size for _, size in inst_rows + cls_rows}) == 1  # one bucket
        assert [k for k, _ in cls_rows] == [i // 2 for i, _ in inst_rows]  # each class row: its row's concept
