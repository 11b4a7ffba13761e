"""Bad input, everywhere the same rule (issue 17 §5): exit code 2, one line on stderr that names
the problem and the fix, no traceback, and nothing written.

One table holds every case: the command line (with placeholders for the files the fixtures
make) and a piece of the expected message. The run-directory cases belong to the run-identity
work (issue 17 §1/§2/§4) and are added to the table there: see the marked block.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastprompt.cli import app

FASTPROMPT = str(Path(sys.executable).parent / "fastprompt")
TINY = ["--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1"]


def train(method="coop", *extra):
    return ["train", "--method", method, "--data", "{demo}", "--out", "{run}", *TINY, "--epochs", "1", *extra]


CASES = {
    # --- hyper-parameters: NaN, negative, out of range
    "lr nan": (train("coop", "--lr", "nan"), "lr=nan must be a number > 0"),
    "lr inf": (train("coop", "--lr", "inf"), "lr=inf must be a number > 0"),
    "group lr negative": (train("vpt-deep", "--lr.visual", "-1"), "lr.visual=-1.0 must be a number > 0"),
    "momentum negative": (train("coop", "--momentum", "-0.5"), "momentum=-0.5 must be a number >= 0"),
    "weight decay nan": (train("coop", "--weight-decay", "nan"), "weight_decay=nan must be a number >= 0"),
    "warmup lr negative": (train("coop", "--warmup-lr", "-1e-5"), "warmup_lr=-1e-05 must be a number >= 0"),
    "warmup epochs negative": (train("coop", "--warmup-epochs", "-1"), "warmup_epochs=-1 must be an integer >= 0"),
    "epochs zero": (train("coop", "--epochs", "0"), "epochs=0 must be an integer >= 1"),
    "method option nan": (train("cavpt", "--cavpt.alpha", "nan"), "alpha=nan must be a number >= 0"),
    "method option negative": (train("e2mim", "--e2mim.mi-weight", "-1"), "mi_weight=-1.0 must be a number >= 0"),
    "seed above 2^32-1": (train("coop", "--seed", str(2**32)), "seed=4294967296 must be an integer in 0..4294967295"),
    "seed negative": (train("coop", "--seed", "-1"), "seed=-1 must be an integer in 0..4294967295"),
    # --- flags and choices
    "option of another method": (train("coop", "--cavpt.topk", "5"),
                                 "--cavpt.topk is an option of cavpt, not of coop; drop --cavpt.topk or use --method cavpt"),
    "off switch of another method": (train("vpt-deep", "--coop.shared"), "--coop.shared is an option of coop"),
    "method not trainable": (train("zeroshot"), "Invalid value for '--method': 'zeroshot' is not one of 'coop'"),
    "method option choice": (train("cavpt", "--cavpt.variant", "dpt"),
                             "Invalid value for '--cavpt.variant': 'dpt' is not one of 'paper', 'released'"),
    "train precision": (train("coop", "--precision", "fp16"), "Invalid value for '--precision': 'fp16'"),
    "train optimizer": (train("coop", "--optimizer", "adam"), "Invalid value for '--optimizer': 'adam'"),
    "train classes new": (train("coop", "--classes", "new"), "Invalid value for '--classes': 'new'"),
    "train device": (train("coop", "--device", "tpu"), "device='tpu' must be one of auto, cpu, cuda"),
    "unknown flag": (train("coop", "--lrr", "0.1"), "No such option: --lrr"),
    "unknown command": (["trian"], "No such command 'trian'. Did you mean 'train'?; see `fastprompt --help`"),
    "unknown root flag": (["--verbose", "train"], "No such option: --verbose (Possible options: --version); see `fastprompt --help`"),
    "missing required flag": (["train", "--data", "{demo}"], "Missing option '--method'. Choose from: coop, vpt-shallow, vpt-deep"),
    # --- weights
    "unknown clip": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip", "ViT-B-3",
                      "--pretrained", "none"], "unknown CLIP model 'ViT-B-3' (did you mean ViT-B-32"),
    "pretrained text file": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip", "fastprompt-tiny",
                              "--pretrained", "{text}"], "is not a checkpoint (neither safetensors nor a torch.save file)"),
    "pretrained unusable checkpoint": (["train", "--method", "coop", "--data", "{demo}", "--out", "{run}", "--clip",
                                        "fastprompt-tiny", "--pretrained", "{wrong_ckpt}"],
                                       "does not fit model fastprompt-tiny"),
    # --- data files
    "beton empty": (train("coop", "--data", "{empty}"), "is truncated (0 bytes"),
    "beton truncated": (train("coop", "--data", "{truncated}"), "is truncated ("),
    "beton missing": (train("coop", "--data", "{missing}"), "does not exist; create it with `fastprompt prepare"),
    # --- eval / zeroshot
    "eval device": (["eval", "{run}", "--data", "{demo}", "--device", "tpu"], "device='tpu' is not known; use auto, cpu"),
    "eval precision": (["eval", "{run}", "--data", "{demo}", "--precision", "fp16"], "Invalid value for '--precision'"),
    "eval classes": (["eval", "{run}", "--data", "{demo}", "--classes", "old"], "Invalid value for '--classes'"),
    "zeroshot seed": (["zeroshot", "--data", "{demo}", *TINY, "--seed", str(2**32)], "seed=4294967296 must be an integer"),
    # --- bench
    "bench steps": (["bench", "--clip", "fastprompt-tiny", "--steps", "0"], "steps=0 must be an integer >= 1"),
    "bench compile mode": (["bench", "--clip", "fastprompt-tiny", "--compile-mode", "fast"],
                           "Invalid value for '--compile-mode': 'fast'"),
    "bench seed": (["bench", "--clip", "fastprompt-tiny", "--seed", str(2**32)], "seed=4294967296 must be an integer"),
    "bench method": (["bench", "--clip", "fastprompt-tiny", "--methods", "coop,cop"], "unknown method 'cop' for bench"),
    "bench variant": (["bench", "--clip", "fastprompt-tiny", "--variants", "slow"], "unknown variant 'slow'"),
    "bench device": (["bench", "--clip", "fastprompt-tiny", "--device", "tpu"], "device='tpu' is not known"),
    "bench json is a folder": (["bench", "--clip", "fastprompt-tiny", "--json", "{here}"],
                               "--json {here} is a folder; pass a file name such as {here}/bench.json"),
    "bench all and methods": (["bench", "--clip", "fastprompt-tiny", "--all", "--methods", "coop"],
                              "--all measures every method and variant; drop --methods"),
    # --- names from file contents never become paths outside --out (issue 21 §3)
    "sidecar name is a relative path": (["sweep", "--methods", "coop", "--data", "{evil}", "--seeds", "1", "--out", "{run}",
                                         *TINY[:4]],
                                        'sidecar {evil_json}: "name" \'../../../../tmp/w/EVIL\' cannot name a file or folder '
                                        '(a path, not a name); set "name" to a plain name such as "eurosat"'),
    "sidecar name is an absolute path": (train("coop", "--data", "{evil_abs}"),
                                         'sidecar {evil_abs_json}: "name" \'/tmp/w/EVIL\' cannot name a file or folder'),
    "sidecar name is '..'": (train("coop", "--data", "{evil_dot}"),
                             'sidecar {evil_dot_json}: "name" \'..\' cannot name a file or folder (it starts with \'.\')'),
    # --- split-file labels: checked per entry, never a list of every label up to the largest (issue 21 §3)
    "coop split label 10**12": (["prepare", "coop", "eurosat", "{coop_huge}", "--out", "{here}/e.beton"],
                                "split_zhou_EuroSAT.json: train[1] has label 1000000000000, but EuroSAT has 10 classes "
                                "(labels 0..9); fix the entry's label, or use the dataset's own split file"),
    "coop split label = class count": (["prepare", "coop", "eurosat", "{coop_ten}", "--out", "{here}/e.beton"],
                                       "test[0] has label 10, but EuroSAT has 10 classes (labels 0..9)"),
    "coop split label negative": (["prepare", "coop", "eurosat", "{coop_negative}", "--out", "{here}/e.beton"],
                                  "train[1] has negative label -1; labels run 0..K-1 - fix the entry's label"),
    "coop split label not an integer": (["prepare", "coop", "eurosat", "{coop_float}", "--out", "{here}/e.beton"],
                                        "train[1] = ['AnnualCrop/1.png', 1.5, 'AnnualCrop'] is not [relative_path, label, "
                                        "classname]; fix the entry"),
    "split-json label 10**12": (["prepare", "imagefolder", "{coop_huge}/eurosat/2750", "--out", "{here}/e.beton",
                                 "--split-json", "{split_huge}"],
                                "train[1] has label 1000000000000, but the file names 2 classes, so labels must run 0..1; "
                                "fix the entry's label"),
    # ---- run-directory cases (issue 17 §1/§2/§4, added by the run-identity work at merge):
    # garbage config.json, garbage metrics.jsonl, garbage or hand-edited checkpoint, a run dir
    # trained on another dataset, non-finite loss (the message must not promise a checkpoint
    # that does not exist). Each is one more row here: (command line, expected message).
    # ---- end of run-directory cases
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The inputs the table refers to: a tiny demo .beton, an empty and a truncated copy (each with
    the sidecar), a text file and a checkpoint of another model."""
    from fastprompt.data import write_demo

    root = tmp_path_factory.mktemp("bad-input")
    demo = root / "demo.beton"
    write_demo(str(demo), images_per_class=4, image_size=32, seed=0, workers=1)
    sidecar = demo.with_suffix(".json").read_text()
    (root / "empty.beton").write_bytes(b"")
    (root / "truncated.beton").write_bytes(demo.read_bytes()[:4096])
    for name in ("empty", "truncated"):
        (root / f"{name}.json").write_text(sidecar)
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"visual.proj": torch.zeros(3, 3)}, root / "other.pt")
    hostile = {}
    for key, name in (("evil", "../../../../tmp/w/EVIL"), ("evil_abs", "/tmp/w/EVIL"), ("evil_dot", "..")):
        beton = root / f"{key}.beton"  # the demo under a sidecar whose "name" is a path
        beton.write_bytes(demo.read_bytes())
        beton.with_suffix(".json").write_text(json.dumps({**json.loads(sidecar), "name": name}))
        hostile.update({key: beton, f"{key}_json": beton.with_suffix(".json")})
    coop = {}
    for key, label in (("coop_huge", 10**12), ("coop_ten", 10), ("coop_negative", -1), ("coop_float", 1.5)):
        folder = root / key / "eurosat"  # CoOp's layout (2750/ and the split file); the check comes before any image is read
        (folder / "2750" / "AnnualCrop").mkdir(parents=True)
        for k in range(3):
            (folder / "2750" / "AnnualCrop" / f"{k}.png").write_bytes(b"")
        entries = {"train": [["AnnualCrop/0.png", 0, "AnnualCrop"], ["AnnualCrop/1.png", label, "AnnualCrop"]],
                   "val": [], "test": [["AnnualCrop/2.png", 0, "AnnualCrop"]]}
        if key == "coop_ten":  # the first label past EuroSAT's 10 classes, under a new class name
            entries = {**entries, "train": entries["train"][:1], "test": [["AnnualCrop/2.png", 10, "Elsewhere"]]}
        (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
        coop[key] = root / key
    split_huge = root / "split_huge.json"  # two class names, one of them labelled 10**12
    split_huge.write_text(json.dumps({"train": [["AnnualCrop/0.png", 0, "a"], ["AnnualCrop/1.png", 10**12, "b"]], "val": [],
                                      "test": [["AnnualCrop/2.png", 0, "a"]]}))
    return {"demo": demo, "empty": root / "empty.beton", "truncated": root / "truncated.beton",
            "missing": root / "missing.beton", "text": root / "notes.txt", "wrong_ckpt": root / "other.pt",
            **hostile, **coop, "split_huge": split_huge}


def _tree(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _check(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, monkeypatch):
    args, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    names = {**{k: str(v) for k, v in files.items()}, "run": str(work / "run"), "here": str(work)}
    args = [a.format(**names) for a in args]
    before = _tree(work), _tree(files["demo"].parent)
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check(result.exit_code, result.stderr, message.format(**names))
    assert result.stdout == ""
    assert (_tree(work), _tree(files["demo"].parent)) == before  # nothing written, not even a run folder


@pytest.mark.slow
def test_offline_pretrained_download_is_one_line(files, tmp_path):
    """No internet, nothing cached: one line naming the fix at once, not minutes of retries.
    A subprocess, because huggingface_hub reads HF_HUB_OFFLINE when it is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    result = subprocess.run([FASTPROMPT, "zeroshot", "--data", str(files["demo"]), "--clip", "ViT-B-32",
                             "--pretrained", "openai", "--workers", "1"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    _check(result.returncode, result.stderr, "could not load pretrained weights 'openai' for ViT-B-32")
    assert "pass a local checkpoint file (--pretrained PATH) or set HF_HUB_OFFLINE=1" in result.stderr
    assert not out.exists() and result.stdout == ""


def test_topk_above_the_class_count_warns_with_the_cap(caplog):
    """--cavpt.topk larger than the class count runs with K_N = the class count and says so at
    WARNING, the level the CLI shows without -v."""
    import fastprompt

    with caplog.at_level("WARNING", logger="fastprompt"):
        model = fastprompt.create_model("cavpt", ["a", "b", "c"], clip="fastprompt-tiny", pretrained=None, topk=5)
    assert model.k_n == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert [r.getMessage() for r in warnings] == ["cavpt topk=5 is more than the 3 classes of this task: capped at 3"]

