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
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    code = ("from fastprompt.models.clip import load_clip\n"
            "from fastprompt.errors import FastpromptError\n"
            "try:\n    load_clip('ViT-B-32', 'openai')\n"
            "except FastpromptError as err:\n    print('MESSAGE', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "MESSAGE could not load pretrained weights 'openai' for ViT-B-32" in proc.stdout, proc.stdout + proc.stderr
    assert "pass a local checkpoint file (--pretrained PATH) or set HF_HUB_OFFLINE=1" in proc.stdout
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
