"""The compiled training step (`fastprompt.training.compiled`) against the eager step.

On CPU the equality tests compile with `backend="aot_eager"`: dynamo captures the step and
AOTAutograd traces and partitions forward and backward exactly as for inductor; only the
code generation is skipped. A cold CPU inductor compile of even the tiny config costs about
a minute of C++ compilation (53 s in this test, up to 130 s standalone on the shared 2-core
machine; 6 s with a warm cache), so the real inductor test is `slow` and runs where CUDA is
present or FASTPROMPT_SLOW_TESTS=1.
"""

import json
import os

import pytest
import torch
from _util import (CLASSNAMES, assert_within_reference_noise, oracle_outcome, reference_copy, relative_error,
                   step_outcome)

import fastprompt
from fastprompt.errors import FastpromptError
from fastprompt.training import compiled as compiled_mod
from fastprompt.training.compiled import compile_step, configure_compile_cache, graph_breaks

TOPK = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 4, 1]])  # (B, K_N): CAVPT's cached top-K


def build(method, clip, **options):
    torch.manual_seed(0)
    model = fastprompt.create_model(method, CLASSNAMES, clip=clip, pretrained=None, **options)
    return model.train()


def assert_same_step(model, step, images, labels, **extra):
    """The compiled step's loss, logits and gradients, and the eager step's, within the float
    noise of the fp32 reference backend's, all against a float64 run of the reference
    (`assert_within_reference_noise`); the same random draws on every side (seed 11)."""
    reference = reference_copy(model)
    oracle = oracle_outcome(model, lambda m: m.loss_and_logits(images.double(), labels, **extra), seed=11)
    want = step_outcome(reference, lambda: reference.loss_and_logits(images, labels, **extra), seed=11)
    eager = step_outcome(model, lambda: model.loss_and_logits(images, labels, **extra), seed=11)
    got = step_outcome(model, lambda: step(images, labels, **extra), seed=11)
    model.zero_grad(set_to_none=True)
    assert len(got) > 2  # gradients were compared
    assert_within_reference_noise({"compiled": got, "eager": eager}, want, oracle)


# every trainable method and variant, with the extra inputs its step takes
METHODS = [
    ("coop", {}, {}),
    ("vpt-shallow", {}, {}),
    ("vpt-deep", {}, {}),
    ("vlp", {"n_ctx": 4}, {}),
    ("cavpt", {"topk": 3}, {"topk": TOPK}),  # paper, eq. 10, cached top-K
    ("cavpt", {"topk": 3, "aux_target": "gt-only", "topk_source": "online"}, {}),
    ("cavpt", {"topk": 3, "variant": "released", "text_prompt": True, "n_ctx": 4, "guidance_epochs": 1}, {}),
    ("cavpt", {"topk": 3, "variant": "released", "text_prompt": True, "n_ctx": 4}, {}),  # after guidance
    ("e2mim", {"n_ctx": 4}, {}),  # class-wise mixup: random pairs and λ inside the graph
    ("e2mim", {"n_ctx": 4, "mixup": False, "mi_input": "logits"}, {}),
    ("cocoop", {}, {}),  # per-image prefixes of the text tower, one pass for every (image, class)
    ("kgcoop", {}, {}),  # CoOp plus the cached hand-crafted features' cosine term
    ("prograd", {}, {}),  # its reported loss (the cross-entropy); the rule's step: test_training_run_compiled_equals_eager
    ("promptsrc", {}, {}),  # ivlp's prompts plus the frozen tower's pass and the cached text target
    ("ivlp", {}, {}),  # deep text (shared prefix) and deep visual prompts carried above their depth
    ("maple", {"prompt_depth": 1}, {}),  # coupled prompts: layer 1 only, carried through every layer
    ("maple", {}, {}),
]
METHOD_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items() if k in ('variant', 'aux_target', 'guidance_epochs', 'mixup', 'prompt_depth')) or 'default'}"
              for m, o, _ in METHODS]


# compiled == eager for the first two in the quick loop; each of the others costs 8-16 s of tracing on 2 cores
COMPILED_CASES = [pytest.param(*case, id=name, marks=() if case[0] in ("coop", "vpt-deep") else pytest.mark.slow)
                  for case, name in zip(METHODS, METHOD_IDS)]


@pytest.mark.slow
@pytest.mark.parametrize("method, options, extra", COMPILED_CASES)
def test_compiled_step_equals_eager(method, options, extra, tiny_clip, images, labels):
    """fullgraph=True: one graph for forward and backward, or the compile fails. Random draws
    (E2MIM's pairs and λ) come from the same seed on both sides: aot_eager runs the graph's
    random ops on the global generator, in program order."""
    torch._dynamo.reset()
    model = build(method, tiny_clip, **options)
    step = compile_step(model, "default", backend="aot_eager", fullgraph=True)
    assert_same_step(model, step, images, labels, **extra)
    torch._dynamo.reset()


@pytest.mark.slow
def test_no_graph_breaks(tiny_clip, images, labels):
    """`graph_breaks` finds none in a step that is one graph (CAVPT with its extra input). That every
    method and variant of METHODS is one graph is test_compiled_step_equals_eager's: fullgraph=True
    fails on any break, naming its place (explaining each again here cost ~25 s of CPU)."""
    method, options, extra = next(case for case in METHODS if case[0] == "cavpt" and "topk" in case[2])
    model = build(method, tiny_clip, **options)
    assert graph_breaks(model, images, labels, **extra) == []


class DataDependent(torch.nn.Module):
    """A step that reads a tensor value into Python, as E2MIM's class-wise pairing does."""

    def loss_and_logits(self, images, labels):
        n = int(labels.max()) + 1  # Tensor.item(): dynamo must break the graph here
        logits = images.flatten(1)[:, :n]  # (B, n)
        return logits.logsumexp(-1).mean(), logits


def test_graph_breaks_are_reported_with_their_place(images, labels):
    breaks = graph_breaks(DataDependent(), images, labels)
    assert len(breaks) == 1 and "test_compiled.py:" in breaks[0] and "item()" in breaks[0], breaks


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("FASTPROMPT_SLOW_TESTS") == "1"),
                    reason="a cold CPU inductor compile takes 1-2 minutes; set FASTPROMPT_SLOW_TESTS=1 to run it")
def test_inductor_step_equals_eager(tiny_clip, images, labels):
    torch._dynamo.reset()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build("vpt-deep", tiny_clip).to(device)
    step = compile_step(model, "default", fullgraph=True)
    assert_same_step(model, step, images.to(device), labels.to(device))
    torch._dynamo.reset()


def test_compile_off_and_bad_modes(tiny_clip):
    model = build("coop", tiny_clip)
    eager = compile_step(model, None)
    assert eager.__name__ == "step" and not hasattr(eager, "_torchdynamo_orig_callable")
    with pytest.raises(FastpromptError, match="compile mode 'fastest'"):
        compile_step(model, "fastest")
    with pytest.raises(FastpromptError, match="inductor setting"):
        compile_step(model, "max-autotune", backend="aot_eager")
    with pytest.raises(FastpromptError, match="backend 'nope'"):
        compile_step(model, "default", backend="nope")


def test_compile_cache_location(monkeypatch, tmp_path):
    # unset, or inductor's own default (which importing open_clip writes into the environment)
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path / "fp"))
    for inherited in (None, compiled_mod._inductor_default_dir()):
        if inherited is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inherited)
        assert configure_compile_cache() == tmp_path / "fp" / "inductor"
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "fp" / "inductor")
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache is True
    # a folder the user chose is kept
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert configure_compile_cache() == tmp_path / "mine"
    assert (tmp_path / "mine").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vpt-deep", "prograd"])  # prograd: the gradient rule's backward per term
def test_training_run_compiled_equals_eager(method, demo_beton, tmp_path):
    """`fastprompt train --compile default` (here through aot_eager) trains to the same metrics and
    prompts as `--compile off`: the trainer's compiled step is the eager step."""
    from safetensors.torch import load_file

    from fastprompt.training import TrainConfig, Trainer

    runs = {}
    for compile_mode in ("off", "default"):
        torch._dynamo.reset()
        out = tmp_path / compile_mode
        trainer = Trainer(TrainConfig(method=method, data=str(demo_beton), out=str(out), clip="fastprompt-tiny",
                                      pretrained=None, epochs=2, warmup_epochs=0, lr=0.05, num_workers=1, device="cpu",
                                      compile=compile_mode, compile_backend="aot_eager"))
        assert isinstance(trainer.step_fn, torch._dynamo.eval_frame.OptimizedModule) == (compile_mode != "off")
        trainer.train()
        trainer.close()
        runs[compile_mode] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                              load_file(str(out / "prompts.safetensors")))
    torch._dynamo.reset()
    (eager_metrics, eager_prompts), (compiled_metrics, compiled_prompts) = runs["off"], runs["default"]
    for got, want in zip(compiled_metrics, eager_metrics):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert compiled_prompts.keys() == eager_prompts.keys()
    for name in eager_prompts:
        assert relative_error(compiled_prompts[name], eager_prompts[name]) <= 1e-4, name


def test_compile_choice_is_validated(demo_beton, tmp_path):
    from typer.testing import CliRunner

    from fastprompt.cli import app
    from fastprompt.training import TrainConfig

    with pytest.raises(FastpromptError, match="compile='fast'"):
        TrainConfig(method="coop", data=str(demo_beton), out=str(tmp_path / "r"), compile="fast")
    config = TrainConfig(method="coop", data=str(demo_beton), out=str(tmp_path / "r"))
    assert config.compile_mode("cpu") is None and config.compile_mode("cuda") == "default"
    result = CliRunner().invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(tmp_path / "r"),
                                      "--compile", "fastest"])
    assert result.exit_code == 2 and "Invalid value for '--compile': 'fastest'" in result.output
    assert not (tmp_path / "r").exists()
