"""The flags of masks, buckets, captions, robust losses and EMA: parsed into their concern, and each bad value
refused in one line naming the flag (exit code 2 from the command line)."""
from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.options.buckets import auto_buckets, buckets_of, parse_bucket_list
from trainer.options.train import parse

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a [V] dog"]


def test_the_flags_land_in_their_concern():
    opts = parse(BASE + ["--masked_loss", "--mask_min", "0.1", "--mask_normalization", "mean",
                         "--aspect_ratio_buckets", "64,64;48,80", "--caption_dropout_rate", "0.1", "--shuffle_caption",
                         "--keep_tokens", "1", "--loss_type", "huber", "--huber_c", "0.2", "--huber_schedule",
                         "exponential", "--use_ema", "--ema_decay", "0.99", "--ema_device", "cpu", "--ema_dtype",
                         "bf16", "--save_raw_weights"])
    d, t, e = opts.data, opts.training, opts.ema
    assert (d.masked_loss, d.mask_min, d.mask_normalization, d.caption_dropout) == (True, 0.1, "mean", 0.1)
    assert (d.shuffle_caption, d.keep_tokens, buckets_of(d)) == (True, 1, [(64, 64), (48, 80)])
    assert (t.loss_type, t.huber_c, t.huber_schedule) == ("huber", 0.2, "exponential")
    assert (e.use_ema, e.ema_decay, e.ema_device, e.ema_dtype, e.save_raw_weights) == (True, 0.99, "cpu", "bf16", True)
    rec = opts.to_dict()
    assert rec["use_ema"] is True and rec["loss_type"] == "huber"  # checkpoints record them (resume compares)


def test_defaults_change_nothing():
    opts = parse(BASE)
    d, t = opts.data, opts.training
    assert not d.masked_loss and buckets_of(d) is None and d.caption_dropout == 0 and not d.shuffle_caption
    assert t.loss_type == "l2" and not opts.ema.use_ema


def test_kohya_switches_mean_ours(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    opts = parse(BASE + ["--conditioning_data_dir", str(masks), "--enable_bucket", "--resolution", "512"])
    assert opts.data.masked_loss and opts.data.mask_dir == str(masks)
    assert buckets_of(opts.data) == auto_buckets(512, 64)


def test_automatic_buckets_keep_the_area_and_come_in_both_orientations():
    for res, step in ((512, 64), (1024, 64), (64, 8)):
        b = auto_buckets(res, step)
        assert b[0] == (res, res)
        assert all(h * w <= res * res and h % step == 0 and w % step == 0 for h, w in b)
        assert {(w, h) for h, w in b} == set(b)
    assert (576, 448) in auto_buckets(512, 64) and (1216, 832) in auto_buckets(1024, 64)


@pytest.mark.parametrize("extra, says", [
    (["--aspect_ratio_buckets", "512;512"], "--aspect_ratio_buckets must be"),
    (["--aspect_ratio_buckets", "512,500"], "multiples of 8"),
    (["--aspect_ratio_buckets", "0,512"], "positive sides"),
    (["--enable_bucket", "--aspect_ratio_buckets", "64,64"], "--enable_bucket means"),
    (["--bucket_reso_steps", "12"], "--bucket_reso_steps must be"),
    (["--mask_dir", "/nonexistent/masks"], "--mask_dir /nonexistent/masks is not a folder"),
    (["--mask_min", "0.2"], "--mask_min shapes --masked_loss's weights"),
    (["--mask_normalization", "mean"], "--mask_normalization shapes --masked_loss's weights"),
    (["--bucket_reso_steps", "32"], "add --aspect_ratio_buckets auto"),
    (["--aspect_ratio_buckets", "64,64", "--bucket_reso_steps", "32"], "add --aspect_ratio_buckets auto"),
    (["--enable_bucket", "--resolution", "32"], "is more than --resolution 32"),
    (["--huber_c", "0.2"], "--huber_c applies to --loss_type huber or smooth_l1"),
    (["--huber_schedule", "constant"], "--huber_schedule applies to"),
    (["--ema_decay", "0.99"], "--ema_decay needs --use_ema"),
    (["--ema_dtype", "bf16"], "--ema_dtype needs --use_ema"),
    (["--masked_loss", "--mask_min", "1"], "--mask_min must be"),
    (["--caption_dropout", "1.5"], "--caption_dropout must be"),
    (["--keep_tokens", "2"], "add --shuffle_caption"),
    (["--shuffle_caption", "--keep_tokens", "-1"], "--keep_tokens must be"),
    (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be > 0"),
    (["--loss_type", "huber", "--huber_schedule", "exponential", "--huber_c", "2"], "must be <= 1"),
    (["--use_ema", "--ema_decay", "1"], "--ema_decay must be"),
    (["--save_raw_weights"], "--save_raw_weights needs --use_ema"),
    (["--ema_device", "cpu"], "--ema_device needs --use_ema"),
])
def test_bad_values_get_one_line(extra, says):
    with pytest.raises(UserError) as e:
        parse(BASE + extra)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_bucket_list_keeps_order_and_drops_repeats():
    assert parse_bucket_list(" 64,64; 48,80;64,64;") == [(64, 64), (48, 80)]
