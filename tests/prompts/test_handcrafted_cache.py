"""Hand-crafted features: computed once, cached in memory and on disk, keyed by everything."""

import torch

from fastprompt.models.clip import load_clip
from fastprompt.prompts import handcrafted


def test_cache_key_changes_with_every_input(tiny_clip):
    bundle = load_clip(tiny_clip)
    base = handcrafted.cache_key(bundle, ["a", "b"], ["a photo of a {}."])
    assert base == handcrafted.cache_key(bundle, ["a", "b"], ["a photo of a {}."])
    assert base != handcrafted.cache_key(bundle, ["a", "c"], ["a photo of a {}."])
    assert base != handcrafted.cache_key(bundle, ["b", "a"], ["a photo of a {}."])
    assert base != handcrafted.cache_key(bundle, ["a", "b"], ["a {}."])
    other = load_clip("fastprompt-tiny", None)
    assert base != handcrafted.cache_key(other, ["a", "b"], ["a photo of a {}."])


def test_disk_then_memory(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path))
    monkeypatch.setattr(handcrafted, "_memory", {})
    bundle = load_clip(tiny_clip)
    calls = []
    real = handcrafted.compute_features
    monkeypatch.setattr(handcrafted, "compute_features", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = handcrafted.template_features(bundle, ["cat", "dog"], ["a photo of a {}."])
    assert len(calls) == 1 and len(list(tmp_path.glob("text-*.safetensors"))) == 1
    again = handcrafted.template_features(bundle, ["cat", "dog"], ["a photo of a {}."])
    assert len(calls) == 1 and torch.equal(first, again)

    monkeypatch.setattr(handcrafted, "_memory", {})  # a new process: read from disk, not recomputed
    from_disk = handcrafted.template_features(bundle, ["cat", "dog"], ["a photo of a {}."])
    assert len(calls) == 1 and torch.equal(first, from_disk)

    handcrafted.template_features(bundle, ["cat", "cow"], ["a photo of a {}."])
    assert len(calls) == 2 and len(list(tmp_path.glob("text-*.safetensors"))) == 2
