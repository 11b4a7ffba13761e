"""`fastprompt prepare`: the commands, and every bad input -> exit 2, one line, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fastprompt.cli import app
from fastprompt.data import open_dataset

runner = CliRunner()


def prepare(*args: str):
    return runner.invoke(app, ["prepare", *map(str, args)])


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_prepare_demo(tmp_path):
    result = prepare("demo", "--out", tmp_path / "d" / "tiny.beton", "--images-per-class", 5, "--size", 32, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("wrote ") and "10 classes" in result.stdout
    ds = open_dataset(tmp_path / "d" / "tiny.beton")
    assert ds.split_sizes == {"train": 20, "val": 10, "test": 20} and ds.name == "demo"  # 5 = 2 + 1 + 2


def test_prepare_imagefolder_with_split_json(coop_tree, tmp_path):
    root, split_json, _ = coop_tree
    result = prepare("imagefolder", root, "--out", tmp_path / "e.beton", "--split-json", split_json, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "eurosat: 18 images, 3 classes; train 9, val 3, test 6; split from split_zhou_EuroSAT.json" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.beton", "e.json"]


@pytest.fixture
def tree(tmp_path, make_tree):
    root = tmp_path / "src"
    make_tree(root, {f"{c}/{k}.png": (12, 12) for c in ("ant", "bee") for k in range(4)})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return root, out_dir


def expect_bad_input(out_dir, list_files, *args, match: str) -> str:
    result = prepare(*args)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert match in line, line
    assert list_files(out_dir) == []  # nothing written, no temporary file left
    return line


def test_missing_root(tree, list_files):
    _, out_dir = tree
    expect_bad_input(out_dir, list_files, "imagefolder", out_dir / "nope", "--out", out_dir / "x.beton", match="does not exist")


def test_class_folder_without_images(tree, list_files):
    root, out_dir = tree
    (root / "cow").mkdir()
    (root / "cow" / "notes.txt").write_text("no images here")
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", match=f"class folder {root / 'cow'} has no images")


def test_unreadable_images_fail_or_are_skipped(tree, list_files):
    root, out_dir = tree
    (root / "ant" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    png = (root / "bee" / "0.png").read_bytes()
    (root / "bee" / "cut.png").write_bytes(png[: len(png) // 2])
    line = expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", "--workers", 2, match="cannot read image")
    assert str(root / "ant" / "garbage.jpg") in line and "and 1 more" in line and "--skip-bad" in line

    result = prepare("imagefolder", root, "--out", out_dir / "x.beton", "--skip-bad", "--workers", 2)
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable image(s)" in result.stdout
    ds = open_dataset(out_dir / "x.beton")
    assert ds.num_samples == 8 and ds.meta["source"]["skipped"] == [str(root / "ant" / "garbage.jpg"), str(root / "bee" / "cut.png")]


def test_split_json_errors(tree, list_files, tmp_path):
    root, out_dir = tree
    split = {"train": [["ant/0.png", 0, "ant"], ["bee/0.png", 1, "bee"]], "val": [["ant/1.png", 0, "ant"]],
             "test": [["bee/1.png", 1, "bee"]]}
    path = tmp_path / "split_zhou_Bugs.json"
    path.write_text(json.dumps({**split, "test": [["bee/9.png", 1, "bee"]]}))
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", "--split-json", path, match="missing under")
    path.write_text(json.dumps({**split, "test": [["bee/1.png", 1, "wasp"]]}))
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", "--split-json", path, match="label 1 is called both 'bee' and 'wasp'")
    path.write_text(json.dumps({**split, "test": [["bee/1.png", 2, "bee"]]}))
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", "--split-json", path, match="class 'bee' has labels 1 and 2")


def test_bad_options(tree, list_files):
    root, out_dir = tree
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.ffcv", match="must end in .beton")
    expect_bad_input(out_dir, list_files, "imagefolder", root, "--out", out_dir / "x.beton", "--jpeg-quality", 0, match="jpeg_quality=0")
    expect_bad_input(out_dir, list_files, "demo", "--out", out_dir / "d.beton", "--images-per-class", 2, match="images_per_class=2")
