"""The demo CLIP: synthetic image-caption pairs and `fastprompt prepare demo-clip`."""

import math

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data.demo import DEMO_CLASSNAMES, DEMO_COLOURS, DEMO_SHAPES, CaptionedShapes, DemoConfig, DemoImages
from fastprompt.errors import FastpromptError
from fastprompt.models.clip import load_clip
from fastprompt.training.pretrain import PretrainConfig, pretrain_clip

runner = CliRunner()
QUICK = dict(steps=3, warmup_steps=1, batch_size=8, images_per_concept=2)


def test_concepts_cover_the_vocabulary_but_never_a_demo_class():
    names = [name for name, _, _ in CaptionedShapes().concepts]
    assert len(names) == len(set(names)) == 90
    assert not set(names) & set(DEMO_CLASSNAMES)
    words = {w for name in names for w in name.split()}
    assert words == {c for c, _ in DEMO_COLOURS} | set(DEMO_SHAPES)


def test_pair_images_are_not_demo_images():
    pairs = CaptionedShapes(image_size=96)
    demo = DemoImages(DemoConfig())
    assert pairs.image(0, 0).shape == (96, 96, 3)
    assert (pairs.image(0, 0) == pairs.image(0, 0)).all()  # a function of (seed, concept, k)
    assert not (pairs.image(0, 0) == demo.load(0)).all()


def test_pretrain_is_deterministic_and_loads_as_a_checkpoint(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    summary = pretrain_clip(str(a), PretrainConfig(**QUICK))
    again = pretrain_clip(str(b), PretrainConfig(**QUICK))
    assert summary.steps == 3 and math.isfinite(summary.final_loss)
    assert (summary.final_loss, summary.retrieval_accuracy) == (again.final_loss, again.retrieval_accuracy)
    hits = summary.retrieval_accuracy / 100 * 3 * 8  # in-batch top-1 over 3 steps of 8 images: a whole number
    assert hits == pytest.approx(round(hits), abs=1e-6)
    sa, sb = torch.load(a), torch.load(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    bundle = load_clip("fastprompt-tiny", pretrained=str(a))
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], sa[k]) for k in sa)
    assert bundle.weights_id.startswith("file:")
    torch.manual_seed(0)
    random_init = load_clip("fastprompt-tiny", pretrained=None).model.state_dict()
    moved = [k for k in sa if not torch.equal(sa[k], random_init[k])]
    assert "visual.conv1.weight" in moved and "text_projection" in moved
    assert "token_embedding.weight" not in moved  # kept at its init: see the module docstring
    assert sorted(tmp_path.iterdir()) == sorted([a, b])  # no temporary file left


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 91), ("lr", 0.0), ("warmup_steps", 600),
                                          ("crop_scale", (0.0, 1.0))])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(FastpromptError, match=field):
        PretrainConfig(**{field: value})


def test_cli_bad_out_exits_2_and_writes_nothing(tmp_path):
    result = runner.invoke(app, ["prepare", "demo-clip", "--out", str(tmp_path / "clip.txt"), "--steps", "2"])
    assert result.exit_code == 2 and "must end in .pt" in result.output
    result = runner.invoke(app, ["prepare", "demo-clip", "--out", str(tmp_path / "clip.pt"), "--steps", "0"])
    assert result.exit_code == 2 and "steps=0" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "clip.pt"
    out.write_bytes(b"someone's checkpoint")
    result = runner.invoke(app, ["prepare", "demo-clip", "--out", str(out), "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert f"--out {out} already exists; pass --overwrite to replace it" in result.stderr
    assert out.read_bytes() == b"someone's checkpoint"  # refused before training


@pytest.mark.slow
def test_cli_overwrite_replaces_out(tmp_path):
    out = tmp_path / "clip.pt"
    out.write_bytes(b"someone's checkpoint")
    result = runner.invoke(app, ["prepare", "demo-clip", "--out", str(out), "--steps", "2", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert isinstance(torch.load(out, weights_only=True), dict)
