"""Packed execution (issue 24 §2-3): the runs of one setting but the seed train as one pack and
leave the run directories a solo run leaves (the same config.json and identity, few-shot files,
losses within 1e-5, the same results); a failing run of a pack fails alone; `--pack auto`
sizes the pack from measured memory; a pack killed mid-epoch resumes to what it would have
given."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.errors import FastpromptError
from fastprompt.training import checkpoint, engine
from fastprompt.training.hooks import EXIT_AFTER_STEP, EXIT_CODE, KILL_AT
from fastprompt.training.pack import auto_pack_size
from fastprompt.training.plan import pack_groups, parse_pack

runner = CliRunner()


@pytest.fixture
def weights(tiny_weights):
    return tiny_weights


def _args(demo_beton, weights, out, method="coop", *extra):
    return ["train", "--method", method, "--data", str(demo_beton), "--out", str(out), "--clip", "fastprompt-tiny",
            "--pretrained", str(weights), "--workers", "1", "--shots", "2", "--batch-size", "10", "--epochs", "2",
            "--warmup-epochs", "0", "--lr", "0.01", "--compile", "off", "--device", "cpu", *extra]


def _run(demo_beton, weights, out, *extra, method="coop"):
    result = runner.invoke(app, _args(demo_beton, weights, out, method, *extra))
    assert result.exit_code == 0, result.output
    return result


def _read(run):
    config = json.loads((run / "config.json").read_text())
    config.pop("out")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((run / "results.json").read_text())
    return config, (run / "fewshot.json").read_text(), metrics, results


@pytest.mark.slow
@pytest.mark.parametrize("method,test_loaders", [("coop", 1), ("vpt-deep", 2)])
def test_a_packed_run_is_the_solo_run(method, test_loaders, demo_beton, weights, tmp_path, monkeypatch):
    """--seeds 1,2 packed and one after another: the same config.json (identity hash included) and
    few-shot files, the first epoch's loss within 1e-5 relative, test accuracy within 1 point; a
    frozen image tower (coop) encodes the test images once for the pack, a prompted one once a run."""
    from fastprompt.data.beton import BetonDataset

    one_epoch = ("--epochs", "1")  # the first epoch's losses (the kill test runs two)
    _run(demo_beton, weights, tmp_path / "solo", "--seeds", "1,2", *one_epoch, method=method)
    loaders, make = [], BetonDataset.loader
    monkeypatch.setattr(BetonDataset, "loader", lambda self, split, **kw: loaders.append(split) or make(self, split, **kw))
    packed = _run(demo_beton, weights, tmp_path / "packed", "--seeds", "1,2", "--pack", "2", *one_epoch, method=method)
    assert loaders.count("test") == test_loaders
    assert "2 runs of " + method + " packed" in packed.stderr
    for seed in (1, 2):
        solo_config, solo_files, solo_metrics, solo_results = _read(tmp_path / "solo" / f"seed{seed}")
        config, files, metrics, results = _read(tmp_path / "packed" / f"seed{seed}")
        assert config == solo_config and files == solo_files
        assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in solo_metrics], rel=1e-5)
        assert [m["lr"] for m in metrics] == [m["lr"] for m in solo_metrics]
        assert results["identity_hash"] == solo_results["identity_hash"]
        assert results["test_accuracy"] == pytest.approx(solo_results["test_accuracy"], abs=1.0)
    seeds = [_read(tmp_path / "packed" / f"seed{s}")[2][0]["loss"] for s in (1, 2)]
    assert seeds[0] != seeds[1]  # each run its own draw and prompts
    # a finished packed run is a finished run to a solo command: not trained again
    again = _run(demo_beton, weights, tmp_path / "packed" / "seed1", "--seed", "1", *one_epoch, method=method)
    assert "done, results in" in " ".join(again.output.split())


def test_what_packs(demo_beton, weights, tmp_path):
    """Plans pack by every setting but the seed and the folder; random weights, a method that does
    not declare it, and another batch size train apart; --pack N caps a pack."""
    from fastprompt.training import TrainConfig
    from fastprompt.training.plan import plan_run

    def plan(seed, **changes):
        base = dict(method="coop", data=str(demo_beton), out=str(tmp_path / f"r{seed}-{len(changes)}"), clip="fastprompt-tiny",
                    pretrained=str(weights), shots=2, epochs=2, warmup_epochs=0)
        return plan_run(TrainConfig(**{**base, "seed": seed, **changes}))

    plans = [plan(1), plan(2), plan(3), plan(1, batch_size=8), plan(1, pretrained=None), plan(1, method="kgcoop")]
    groups = pack_groups(plans, "auto")
    assert [[p.config.seed for p in g] for g in groups] == [[1, 2, 3], [1], [1], [1]]
    assert [len(g) for g in pack_groups(plans, 2)] == [2, 1, 1, 1, 1]
    assert [len(g) for g in pack_groups(plans, 1)] == [1] * 6
    assert (parse_pack("off"), parse_pack("auto"), parse_pack("4")) == (1, "auto", 4)


@pytest.mark.slow
def test_a_failing_run_fails_alone(demo_beton, weights, tmp_path):
    """A run of the pack whose folder cannot be its run (another program's files) fails; the others
    train and finish; under the CLI (not keep_going) the failure is the command's error."""
    (tmp_path / "seeds" / "seed2").mkdir(parents=True)
    (tmp_path / "seeds" / "seed2" / "notes.txt").write_text("mine\n")
    from fastprompt.training import TrainConfig
    from fastprompt.training.plan import plan_run

    request = dict(method="coop", data=str(demo_beton), clip="fastprompt-tiny", pretrained=str(weights), shots=2, epochs=1,
                   warmup_epochs=0, batch_size=10, num_workers=1, device="cpu", compile="off")
    plans = [plan_run(TrainConfig(**request, seed=s, out=str(tmp_path / "seeds" / f"seed{s}"))) for s in (1, 2, 3)]
    seen = []
    results = engine.execute(plans, pack=3, keep_going=True, on_result=lambda p, r, e: seen.append((p.config.seed, e)))
    assert [r is None for r in results] == [False, True, False]
    assert dict(seen)[2].startswith(f"--out {tmp_path / 'seeds' / 'seed2'} is not empty (notes.txt)")
    assert (tmp_path / "seeds" / "seed1" / "results.json").is_file() and (tmp_path / "seeds" / "seed3" / "results.json").is_file()
    assert sorted(p.name for p in (tmp_path / "seeds" / "seed2").iterdir()) == ["notes.txt"]
    with pytest.raises(FastpromptError, match="is not empty \\(notes.txt\\)"):
        engine.execute(plans, pack=3)


@pytest.mark.slow
def test_auto_sizes_the_pack_from_measured_memory(demo_beton, weights, tmp_path, monkeypatch):
    """--pack auto: the engine's probe (a packed step of the first run's model and batch shape)
    measures a run's memory; little memory available packs one run at a time, much packs all."""
    sizes = []

    def measured(available):
        def auto(probe, runs, device, **kw):
            choice = auto_pack_size(probe, runs, device, available=available, min_gain=0.0, repeats=1)
            sizes.append(choice.size)
            return choice

        return auto

    for available, out in ((1, "small"), (2**40, "large")):
        monkeypatch.setattr(engine, "auto_pack_size", measured(available))
        result = _run(demo_beton, weights, tmp_path / out, "--seeds", "1,2,3", "--pack", "auto", "--epochs", "1")
        assert "--pack auto:" in result.stderr
    assert sizes == [1, 3]
    for seed in (1, 2, 3):
        assert _read(tmp_path / "small" / f"seed{seed}")[:2] == _read(tmp_path / "large" / f"seed{seed}")[:2]


@pytest.mark.slow
def test_a_killed_pack_resumes_exactly(demo_beton, weights, tmp_path):
    """A pack of 2 (2 epochs of 2 steps), one run folder killed twice, each process resuming the one
    before (a chain, as test_faults' kill points): first while the second run writes its first
    checkpoint (the runs then stand at epochs 1 and 0), then, resumed (the behind one trains its
    epoch alone, then both pack), after step 3 (mid epoch 2, both at epoch 1); run again, every run
    ends with the prompts, metrics and results of the pack that never stopped."""
    def command(out):
        return [sys.executable, "-m", "fastprompt.cli", *_args(demo_beton, weights, out), "--seeds", "1,2", "--pack", "2"]

    _run(demo_beton, weights, tmp_path / "whole", "--seeds", "1,2", "--pack", "2")  # in this process, never killed
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the killed processes reduce as this one
    out = tmp_path / "killed"
    stand = lambda: [(checkpoint.read_record(out / f"seed{s}") or {"epoch": 0})["epoch"] for s in (1, 2)]
    for kill, resumes, epochs in (({KILL_AT: "checkpoint-tensors:2"}, None, [1, 0]),
                                  ({EXIT_AFTER_STEP: "3"}, "seed2 from epoch 1", [1, 1]),
                                  (None, "from epoch 2", None)):
        ran = subprocess.run(command(out), capture_output=True, text=True, env={**os.environ, **threads, **(kill or {})})
        assert ran.returncode == (EXIT_CODE if kill else 0), ran.stderr
        if resumes is not None:
            assert resumes in ran.stderr, ran.stderr
        if kill:
            assert not (out / "seed1" / "results.json").exists() and stand() == epochs
    _same_runs(tmp_path / "whole", out)


def _same_runs(whole, resumed):
    from safetensors.torch import load_file

    for seed in (1, 2):
        a, b = whole / f"seed{seed}", resumed / f"seed{seed}"
        (ca, fa, ma, ra), (cb, fb, mb, rb) = _read(a), _read(b)
        assert ca == cb and fa == fb
        assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
        assert ra["test_accuracy"] == rb["test_accuracy"]
        pa, pb = load_file(str(a / "prompts.safetensors")), load_file(str(b / "prompts.safetensors"))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
