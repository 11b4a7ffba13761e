"""Validation and the model that is reported (issue 25 §1): `--eval-every E` scores the run's
few-shot val subset into metrics.jsonl and TensorBoard and changes nothing trained;
`--final-model best-val` reports the first epoch with the best val accuracy (Dassl's
`TEST.FINAL_MODEL best_val`), keeps it in every checkpoint, and resumes to the uninterrupted
run's choice; which settings are the run's identity."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data import open_dataset
from fastprompt.training import TrainConfig, Trainer, checkpoint, train
from fastprompt.training.identity import first_difference, identity, identity_hash

runner = CliRunner()
DETERMINISTIC = ("epoch", "loss", "train_accuracy", "lr", "images")


def _config(data, out, **changes):
    base = dict(method="coop", data=str(data), out=str(out), clip="fastprompt-tiny", pretrained=None, shots=2,
                batch_size=10, epochs=3, warmup_epochs=0, lr=0.05, num_workers=1, device="cpu", compile="off",
                options={"n_ctx": 4})
    return TrainConfig(**{**base, **changes})


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _prompts(out):
    return load_file(str(out / "prompts.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_scores_val_and_changes_nothing_trained(demo_beton, tmp_path):
    from fastprompt.training.tensorboard import TensorBoardLogger

    plain = train(_config(demo_beton, tmp_path / "plain"))
    board = TensorBoardLogger(tmp_path / "validated" / "tensorboard")
    try:
        validated = train(_config(demo_beton, tmp_path / "validated", eval_every=2), on_epoch=board)
    finally:
        board.close()
    lines = _lines(tmp_path / "validated")
    # every 2 epochs and after the last
    assert [line["epoch"] for line in lines if "val_accuracy" in line] == [2, 3]
    val_images = len(open_dataset(demo_beton).fewshot_record(2, 1)["val"])  # Dassl's few-shot val: min(2, 4) per class
    assert val_images == 20
    for line in lines[1:]:
        hits = line["val_accuracy"] / 100 * val_images
        assert abs(hits - round(hits)) < 1e-9  # a share of the 20 val images
    # the same prompts, metrics and test numbers as the run that never validated
    assert _equal(_prompts(tmp_path / "plain"), _prompts(tmp_path / "validated"))
    assert [{k: l[k] for k in DETERMINISTIC} for l in lines] == \
           [{k: l[k] for k in DETERMINISTIC} for l in _lines(tmp_path / "plain")]
    assert validated["test_accuracy"] == plain["test_accuracy"] and validated["confusion"] == plain["confusion"]
    # the last model is reported, with its val accuracy; a run that never validated has none
    assert (validated["final_model"], validated["reported_epoch"], validated["val_accuracy"]) == \
           ("last", 3, lines[-1]["val_accuracy"])
    assert (plain["final_model"], plain["reported_epoch"]) == ("last", 3) and "val_accuracy" not in plain
    # TensorBoard: the val accuracy under Dassl's tag, at its epochs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "validated" / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("val/accuracy")] == \
           [(l["epoch"], round(l["val_accuracy"], 4)) for l in lines if "val_accuracy" in l]
    assert "train/val_accuracy" not in events.Tags()["scalars"]


# scripted val accuracies by epoch: epoch 3 ties epoch 2, so Dassl's strict `>` keeps epoch 2
SCRIPT = {1: 50.0, 2: 80.0, 3: 80.0, 4: 60.0}


class _Stop(Exception):
    pass


@pytest.fixture
def scripted_validation(monkeypatch):
    """Trainer.validate returns SCRIPT[epoch] and records each epoch's prompts in the returned dict."""
    seen = {}

    def validate(self):
        seen[self.epoch] = {k: v.detach().cpu().clone() for k, v in self.model.prompt_state_dict().items()}
        return SCRIPT[self.epoch]

    monkeypatch.setattr(Trainer, "validate", validate)
    return seen


def test_best_val_reports_the_first_best_epoch_and_resumes_to_it(demo_beton, tmp_path, scripted_validation):
    seen = scripted_validation
    whole = tmp_path / "whole"
    results = train(_config(demo_beton, whole, epochs=4, eval_every=1, final_model="best-val"))
    assert (results["final_model"], results["reported_epoch"], results["val_accuracy"]) == ("best-val", 2, 80.0)
    assert _equal(_prompts(whole), seen[2]) and not _equal(seen[2], seen[4])  # the epoch-2 prompts, not the last
    assert [line["val_accuracy"] for line in _lines(whole)] == [50.0, 80.0, 80.0, 60.0]
    record, tensors = checkpoint.load(whole)
    assert record["best_val"] == {"epoch": 2, "val_accuracy": 80.0}
    assert _equal({k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}, seen[2])

    # stopped in epoch 4 (validated, its checkpoint not written): the checkpoint after epoch 3 holds epoch 2's
    # prompts as the best, and the resumed run reports them as the uninterrupted run does
    part = tmp_path / "part"

    def stop_at_4(line):
        if line["epoch"] == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train(_config(demo_beton, part, epochs=4, eval_every=1, final_model="best-val"), on_epoch=stop_at_4)
    assert checkpoint.load(part)[0]["epoch"] == 3 and not (part / "results.json").exists()
    resumed = train(_config(demo_beton, part, epochs=4, eval_every=1, final_model="best-val"))
    assert _equal(_prompts(part), _prompts(whole))
    assert {k: resumed[k] for k in ("reported_epoch", "val_accuracy", "test_accuracy", "per_class", "confusion")} == \
           {k: results[k] for k in ("reported_epoch", "val_accuracy", "test_accuracy", "per_class", "confusion")}

    # a finished run evaluated again (--force-eval) reports the best-val model, not the checkpoint's last prompts
    again = train(_config(demo_beton, whole, epochs=4, eval_every=1, final_model="best-val"), force_eval=True)
    assert again["reported_epoch"] == 2 and again["test_accuracy"] == results["test_accuracy"]
    assert _equal(_prompts(whole), seen[2])


def test_a_checkpoint_without_its_best_prompts_is_refused(demo_beton, tmp_path, scripted_validation):
    out = tmp_path / "run"

    def stop_at_3(line):
        if line["epoch"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(_config(demo_beton, out, eval_every=1, final_model="best-val"), on_epoch=stop_at_3)
    record = json.loads((out / checkpoint.RECORD).read_text())
    del record["best_val"]
    (out / checkpoint.RECORD).write_text(json.dumps(record))
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(out), "--clip",
                                 "fastprompt-tiny", "--pretrained", "none", "--shots", "2", "--batch-size", "10",
                                 "--epochs", "3", "--warmup-epochs", "0", "--lr", "0.05", "--workers", "1",
                                 "--coop.n-ctx", "4", "--eval-every", "1", "--final-model", "best-val"])
    assert result.exit_code == 2, result.output
    assert "checkpoint.json lacks the best-on-val prompts of a --final-model best-val run validated after epochs 1, 2; " \
           "pass --restart" in " ".join(result.output.split())


def test_which_settings_are_the_runs_identity(demo_beton, tmp_path):
    """--final-model is identity (another model is reported); --eval-every is an execution setting, but
    under best-val, where its epochs are the candidates. A last-model run's identity (and hash) is
    that of a run before these options existed."""
    last = _config(demo_beton, tmp_path).to_dict()
    before = {k: v for k, v in last.items() if k not in ("final_model", "eval_every")}  # an earlier version's config
    assert identity(last) == identity(before) and identity_hash(last) == identity_hash(before)
    assert first_difference({**last, "eval_every": 5}, last) is None
    assert first_difference(last, before) is None and first_difference(before, last, both=True) is None
    best = {**last, "final_model": "best-val", "eval_every": 1}
    assert first_difference(best, before) == ("final_model", "best-val", "last")
    assert first_difference(before, best) == ("final_model", "last", "best-val")
    assert first_difference({**best, "eval_every": 2}, best) == ("eval_every", 2, 1)
    assert identity_hash(best) != identity_hash({**best, "eval_every": 2}) != identity_hash(last)


def test_the_run_shows_val_accuracy_and_the_reported_model(demo_beton, tmp_path):
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(tmp_path / "run"),
                                 "--clip", "fastprompt-tiny", "--pretrained", "none", "--shots", "1", "--batch-size", "10",
                                 "--epochs", "2", "--warmup-epochs", "0", "--workers", "1", "--coop.n-ctx", "4",
                                 "--eval-every", "1", "--final-model", "best-val"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    lines = _lines(tmp_path / "run")
    best = max(range(2), key=lambda i: (lines[i]["val_accuracy"], -i))  # the first of the best
    assert printed["reported_epoch"] == best + 1 and "confusion" not in printed  # the matrix stays in results.json
    assert f"epoch 1/2 loss {lines[0]['loss']:.4f} acc {lines[0]['train_accuracy']:.1f}% val " \
           f"{lines[0]['val_accuracy']:.1f}%" in result.stderr
    assert f"(best-val model of epoch {best + 1})" in result.stderr


def test_eval_every_needs_val_images(tmp_path):
    """A .beton without val images: --eval-every is one line naming the fix, and nothing is written."""
    from PIL import Image

    from fastprompt.data import write_imagefolder

    root = tmp_path / "images"
    entries = {"train": [], "val": [], "test": []}
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (24, 24), (80 * label, 40 * k, 90)).save(root / name / f"{k}.png")
            entries["train" if k < 2 else "test"].append([f"{name}/{k}.png", label, name])
    (tmp_path / "split.json").write_text(json.dumps(entries))
    write_imagefolder(str(root), str(tmp_path / "noval.beton"), split_json=str(tmp_path / "split.json"), workers=1,
                      eval_size=64)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--method", "coop", "--data", str(tmp_path / "noval.beton"), "--out", str(out),
                                 "--clip", "fastprompt-tiny", "--pretrained", "none", "--epochs", "1", "--workers", "1",
                                 "--warmup-epochs", "0", "--eval-every", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: eval_every=1: {tmp_path / 'noval.beton'} holds no val images of the run's classes to validate on; "
        "prepare it again with a val split (`fastprompt prepare`), or drop --eval-every and --final-model best-val")
    assert not out.exists()


def test_sweep_gives_every_cell_eval_every_and_final_model(demo_beton, tmp_path, monkeypatch):
    import fastprompt.sweep
    from fastprompt.sweep import expand

    asked = []
    monkeypatch.setattr(fastprompt.sweep, "prepare", lambda config: asked.append(config) or [])
    result = runner.invoke(app, ["sweep", "--methods", "coop,vpt-deep", "--data", str(demo_beton), "--out",
                                 str(tmp_path / "s"), "--seeds", "1", "--shots", "2", "--clip", "fastprompt-tiny",
                                 "--pretrained", "none", "--epochs", "2", "--warmup-epochs", "0", "--eval-every", "2",
                                 "--final-model", "best-val", "--dry-run"])
    assert result.exit_code == 0, result.output
    cells = expand(asked[0])
    assert len(cells) == 2 and all((c.config.eval_every, c.config.final_model) == (2, "best-val") for c in cells)
