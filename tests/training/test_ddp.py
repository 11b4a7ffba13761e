"""DDP over 2 gloo processes against one process. (Exact resume after killed processes is
tests/training/test_faults.py's.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastprompt.cli import app

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("method, options", [
    ("vlp", ["--coop.n-ctx", "4"]),
    ("prograd", []),  # a gradient rule: no DDP wrap, the trainer averages each term's gradient over ranks
])
def test_ddp_two_processes_match_one(method, options, demo_beton, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # no warm-up: the visual group's default of 10 epochs does not fit in 3
    # one process: this one (the comparison's tolerance is not about the thread count)
    single = CliRunner().invoke(app, _args(demo_beton, one, method, 3, *options, "--device", "cpu", "--warmup-epochs", "0"))
    assert single.exit_code == 0, single.output
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), FASTPROMPT,
         *_args(demo_beton, two, method, 3, *options, "--device", "cpu", "--warmup-epochs", "0")],
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
