"""Loading CLIP: names, tags, local checkpoint files, instances, and the errors for each."""

import open_clip
import pytest
import torch

from fastprompt.errors import FastpromptError
from fastprompt.models.clip import TINY, load_clip


def test_tiny_config_is_shipped_and_frozen():
    bundle = load_clip(TINY, None)
    assert bundle.image_size == 64 and bundle.vision_width == 64 and bundle.vision_layers == 3
    assert all(not p.requires_grad for p in bundle.model.parameters())
    assert not bundle.model.training
    assert bundle.weights_id.startswith("params:")


def test_local_checkpoint_file_loads_its_weights(tmp_path, tiny_clip):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.state_dict(), path)
    bundle = load_clip(TINY, str(path))
    for (name, a), b in zip(tiny_clip.state_dict().items(), bundle.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert bundle.weights_id.startswith("file:")


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, tiny_clip):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.state_dict(), path)
    with pytest.raises(FastpromptError, match="does not fit model ViT-B-32"):
        load_clip("ViT-B-32", str(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FastpromptError, match="checkpoint file not found.*missing.pt"):
        load_clip(TINY, str(tmp_path / "missing.pt"))


def test_unknown_model_and_tag():
    with pytest.raises(FastpromptError, match="unknown CLIP model 'ViT-B-33'.*did you mean"):
        load_clip("ViT-B-33", None)
    with pytest.raises(FastpromptError, match="unknown pretrained tag 'opena' for ViT-B-32; valid tags: .*openai"):
        load_clip("ViT-B-32", "opena")


def test_instance_is_used_as_given(tiny_clip):
    bundle = load_clip(tiny_clip)
    assert bundle.model is tiny_clip and bundle.name == "custom"
    with pytest.raises(FastpromptError, match="needs an open_clip.CLIP"):
        load_clip(torch.nn.Linear(2, 2))


def test_weights_id_follows_the_weights(tiny_clip):
    other = open_clip.create_model(TINY, pretrained=None)
    assert load_clip(tiny_clip).weights_id != load_clip(other).weights_id
    assert load_clip(tiny_clip).weights_id == load_clip(tiny_clip).weights_id
