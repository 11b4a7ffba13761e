"""`--pretrained FILE` is read without running code, and every bad file or failed download
is one line naming the fix."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fastprompt.errors import FastpromptError
from fastprompt.models.clip import load_clip


class _Planted:
    """Unpickling this runs `os.system` (what a hostile checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_does_not_run(tmp_path, tiny_clip):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_clip.state_dict(), "payload": _Planted(marker)}, path)
    with pytest.raises(FastpromptError, match="unpickling them can run code; convert it to safetensors, or pass --trust-pickle"):
        load_clip("fastprompt-tiny", str(path))
    assert not marker.exists()


def test_trust_pickle_loads_a_checkpoint_with_objects(tmp_path, tiny_clip):
    path = tmp_path / "with-args.pt"
    torch.save({"state_dict": tiny_clip.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(FastpromptError, match="--trust-pickle"):
        load_clip("fastprompt-tiny", str(path))
    model = load_clip("fastprompt-tiny", str(path), trust_pickle=True).model
    torch.testing.assert_close(model.logit_scale, tiny_clip.logit_scale)
    torch.testing.assert_close(model.visual.conv1.weight, tiny_clip.visual.conv1.weight)


def test_safetensors_checkpoint_loads(tmp_path, tiny_clip):
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    model = load_clip("fastprompt-tiny", str(path)).model
    torch.testing.assert_close(model.token_embedding.weight, tiny_clip.token_embedding.weight)


@pytest.mark.parametrize("content, message", [
    (b"hello, not weights\n", "is not a checkpoint \\(neither safetensors nor a torch.save file\\)"),
    (b"PK\x03\x04" + b"\x00" * 60, "checkpoint .* (is unreadable|does not fit model fastprompt-tiny)"),
    (None, "does not fit model fastprompt-tiny"),  # a torch.save file of something else: a list
])
def test_bad_checkpoint_files_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(FastpromptError, match=message) as info:
        load_clip("fastprompt-tiny", str(path))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_offline_download_says_what_to_do(tmp_path):
    """HF_HUB_OFFLINE=1 set by the user: the local cache only, and one complete line."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = ("from fastprompt.models.clip import load_clip\n"
            "from fastprompt.errors import FastpromptError\n"
            "try:\n    load_clip('ViT-B-32', 'openai')\n"
            "except FastpromptError as err:\n    print('MESSAGE', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert f"MESSAGE could not download the pretrained weights 'openai' of ViT-B-32: HF_HUB_OFFLINE is set, and they are " \
           f"not in the local cache {tmp_path}/hf/hub; download them where there is internet " \
           f"(https://huggingface.co/timm/vit_base_patch32_clip_224.openai) and pass --pretrained FILE, or copy that " \
           f"machine's cache folder to {tmp_path}/hf/hub\n" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr


# ------------------------------------------------------------------ a pretrained tag without internet (issue 21 §4)
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at `hub.endpoint(url)` with an empty cache and no proxy; what
    open_clip.create_model is called with (and whether the hub is offline then) in `hub.calls`."""
    import open_clip
    from huggingface_hub import constants

    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    state = argparse.Namespace(calls=[], endpoint=lambda url: monkeypatch.setattr(constants, "ENDPOINT", url))
    real = open_clip.create_model

    def recorded(*args, **kwargs):
        state.calls.append((args, kwargs, constants.HF_HUB_OFFLINE))
        return state.model if hasattr(state, "model") else real(*args, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", recorded)
    return state


def test_an_unreachable_hub_fails_at_once_with_one_complete_line(hub, tmp_path):
    """Nothing listens on 127.0.0.1:9: the tag loads from the (empty) cache only, so the error comes
    from the cache lookup, not from huggingface_hub's five retries of two files (~50 s)."""
    hub.endpoint("http://127.0.0.1:9")
    with pytest.raises(FastpromptError) as info:
        load_clip("ViT-B-32", "openai")
    assert str(info.value) == (
        "could not download the pretrained weights 'openai' of ViT-B-32: 127.0.0.1 is unreachable (Connection refused), "
        f"and they are not in the local cache {tmp_path}/hub-cache; download them where there is internet "
        "(http://127.0.0.1:9/timm/vit_base_patch32_clip_224.openai) and pass --pretrained FILE, or copy that machine's "
        f"cache folder to {tmp_path}/hub-cache")
    assert [(kwargs["pretrained"], offline) for _, kwargs, offline in hub.calls] == [("openai", True)]


def test_an_unreachable_hub_still_loads_cached_weights_and_a_reachable_one_downloads(hub, tiny_clip):
    """Offline, open_clip is asked in huggingface_hub's offline mode (a cached file loads); online,
    open_clip's own download runs untouched (the hub is a socket that accepts the probe)."""
    import socket

    from huggingface_hub import constants

    hub.model = tiny_clip  # what open_clip would build from the cached or downloaded file
    hub.endpoint("http://127.0.0.1:9")
    assert load_clip("ViT-B-32", "openai").weights_id == "tag:openai"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        hub.endpoint(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert load_clip("ViT-B-32", "openai").weights_id == "tag:openai"
    assert [(args, kwargs["pretrained"], offline) for args, kwargs, offline in hub.calls] == \
        [(("ViT-B-32",), "openai", True), (("ViT-B-32",), "openai", False)]
    assert constants.HF_HUB_OFFLINE is False  # offline for that one call only
