"""Exact resume after a killed process, and DDP over 2 gloo processes against one process.

The kill is deterministic: the trainer's test hook (`fastprompt/training/hooks.py`) ends the
process with `os._exit` right after a chosen optimiser step."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastprompt.training.hooks import EXIT_AFTER_STEP, EXIT_CODE

FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")
DETERMINISTIC = ("epoch", "loss", "train_accuracy", "lr", "images")


def _args(data, out, method, epochs, *extra):
    return ["train", "--method", method, "--data", str(data), "--out", str(out), "--clip", "fastprompt-tiny",
            "--pretrained", "none", "--epochs", str(epochs), "--batch-size", "32", "--lr", "0.05", "--workers", "1",
            *extra]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # the same float reductions in every process
    return env


def _metrics(out):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [{k: line[k] for k in DETERMINISTIC} for line in lines]


def _checkpoint_epoch(out):
    return json.loads((out / "checkpoint.json").read_text())["epoch"]


@pytest.mark.slow
def test_killed_run_resumes_exactly(demo_beton, tmp_path):
    args = lambda out: [FASTPROMPT, *_args(demo_beton, out, "e2mim", 8, "--coop.n-ctx", "4")]
    full, part = tmp_path / "full", tmp_path / "part"
    subprocess.run(args(full), check=True, env=_env(), capture_output=True)
    steps_per_epoch = _metrics(full)[0]["images"] // 32

    # killed (os._exit, no cleanup) one step into epoch 3: the checkpoint after epoch 2 is the last
    kill_env = {**_env(), EXIT_AFTER_STEP: str(2 * steps_per_epoch + 1)}
    killed = subprocess.run(args(part), env=kill_env, capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr[-3000:]
    assert not (part / "results.json").exists() and not (part / "prompts.safetensors").exists()
    assert _checkpoint_epoch(part) == 2
    assert _metrics(part) == _metrics(full)[:2]

    resumed = subprocess.run(args(part), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    said = " ".join(resumed.stderr.split())  # the console wraps long lines
    assert "after epoch 2/8" in said and "resuming" in said
    a, b = load_file(str(full / "prompts.safetensors")), load_file(str(part / "prompts.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _metrics(full) == _metrics(part)
    timing = ("wall_seconds", "train_seconds")  # results.json's clock readings
    results = [{k: v for k, v in json.loads((run / "results.json").read_text()).items() if k not in timing}
               for run in (full, part)]
    assert results[0] == results[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one(demo_beton, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # no warm-up: the visual group's default of 10 epochs does not fit in 3
    single = subprocess.run([FASTPROMPT, *_args(demo_beton, one, "vlp", 3, "--coop.n-ctx", "4", "--device", "cpu",
                                                "--warmup-epochs", "0")],
                            env=_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), FASTPROMPT,
         *_args(demo_beton, two, "vlp", 3, "--coop.n-ctx", "4", "--device", "cpu", "--warmup-epochs", "0")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    a, b = load_file(str(one / "prompts.safetensors")), load_file(str(two / "prompts.safetensors"))
    for name in a:
        err = float((a[name] - b[name]).abs().max() / a[name].abs().max())
        assert err < 1e-4, (name, err)
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["images"] for m in m1] == [m["images"] for m in m2]
    for x, y in zip(m1, m2):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
