"""Methods know their own facts: a method added in this file alone (registered here) gets its
flags in `fastprompt train --help`, trains through the CLI and rebuilds from its run directory;
the built-in methods' declared facts agree with the models they build."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import fastprompt
from fastprompt.cli import app
from fastprompt.methods import PromptModel, register_method, unregister_method
from fastprompt.methods.options import Options
from fastprompt.methods.registry import METHODS, MethodSpec, ParamGroup, declare, option_flags

from _util import CLASSNAMES

runner = CliRunner()


@dataclass
class ToyOptions(Options):
    flag_prefix: ClassVar[str] = "toy"

    scale: float = 1.0  # multiplies the learned per-class bias added to the logits
    mirror: bool = False  # flip the sign of the bias


@pytest.fixture
def toy():
    @register_method("toy")
    class Toy(PromptModel):
        """Zero-shot logits plus a learned per-class bias: one parameter group of its own."""

        options = ToyOptions
        groups = (ParamGroup("toy", lr=0.1, warmup_epochs=0),)
        frozen_image_tower = True

        def __init__(self, bundle, classnames, templates, backend, config):
            super().__init__(bundle, classnames, templates, backend, config)
            device = self.clip.logit_scale.device
            self.toy = nn.ParameterDict({"bias": nn.Parameter(torch.zeros(self.num_classes, device=device))})

        def _bias(self):
            return (-1 if self.config.mirror else 1) * self.config.scale * self.toy["bias"]  # (K,)

        def forward(self, images):
            return super().forward(images) + self._bias()  # (B, K)

        def loss_and_logits(self, images, labels, features=None):
            x = self.image_features(images, {"features": features})  # (B, D)
            logits = self.logit_scale() * x @ self.text_features().t() + self._bias()  # (B, K)
            return F.cross_entropy(logits, labels), logits.detach()

    yield Toy
    unregister_method("toy")


@pytest.mark.slow
def test_a_method_added_in_one_file_trains_through_the_cli(toy, demo_beton, tmp_path):
    assert "toy" in fastprompt.list_methods()
    helptext = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--toy.scale" in helptext and "Multiplies the learned per-class bias added to the logits (default: 1.0)" in helptext
    assert "--toy.mirror" in helptext and "--toy.no-mirror" in helptext and "--lr.toy" in helptext

    out = tmp_path / "toy"
    result = runner.invoke(app, ["train", "--method", "toy", "--data", str(demo_beton), "--out", str(out),
                                 "--clip", "fastprompt-tiny", "--pretrained", "none", "--workers", "1", "--shots", "2",
                                 "--batch-size", "10", "--epochs", "2", "--toy.scale", "2", "--toy.mirror",
                                 "--lr.toy", "0.5", "--feature-cache", "1"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["options"] == {"scale": 2.0, "mirror": True}
    assert config["group_lr"] == {"toy": 0.5} and config["group_warmup_epochs"] == {"toy": 0}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines] == [{"toy": 0.5}, {"toy": pytest.approx(0.25)}]  # Dassl: ½·lr·(1 + cos(π/2))
    bias = load_file(str(out / "prompts.safetensors"))["toy.bias"]
    assert bias.abs().sum() > 0

    model = fastprompt.load_run(str(out))
    assert isinstance(model, toy) and model.config == ToyOptions(scale=2.0, mirror=True)
    assert torch.equal(model.toy["bias"], bias)

    bad = runner.invoke(app, ["train", "--method", "coop", "--data", str(demo_beton), "--out", str(tmp_path / "x"),
                              "--toy.scale", "2"])
    assert bad.exit_code == 2 and "--toy.scale is an option of toy, not of coop" in bad.output


def test_flags_of_the_builtin_options_keep_their_names():
    flags = {fl.field: fl for fl in option_flags()}
    assert flags["n_ctx"].flag == "--coop.n-ctx" and flags["n_prompts"].flag == "--vpt.n-prompts"
    assert (flags["csc"].flag, flags["csc"].off_flag) == ("--coop.csc", "--coop.shared")
    assert flags["mixup"].off_flag == "--e2mim.no-mixup" and flags["text_prompt"].flag == "--cavpt.text-prompt"
    assert flags["topk"].type is int and flags["alpha"].type is float and flags["infer"].type is str
    assert flags["topk"].help.startswith("K_N classes per image")


def test_a_method_must_declare_its_facts():
    class Incomplete(PromptModel):
        options = ToyOptions

    with pytest.raises(TypeError, match="must declare `groups`"):
        register_method("incomplete")(Incomplete)
    assert "incomplete" not in METHODS


def test_a_declared_method_states_its_facts_once():
    """A built-in method's facts live in its declaration (fastprompt.methods.specs, torch-free):
    its model class gets them from there and may not state them again."""
    from fastprompt.methods.registry import method_class, method_spec

    spec = method_spec("coop")
    cls = method_class("coop")
    assert spec.model is cls and cls.spec is spec and cls.method == "coop"
    assert (cls.options, cls.groups, cls.frozen_image_tower) == (spec.options, spec.groups, spec.frozen_image_tower)
    assert spec.module == cls.__module__ == "fastprompt.methods.coop"

    with pytest.raises(ValueError, match="already registered by Coop"):
        register_method("coop")(type("Other", (PromptModel,), {}))
    assert method_class("coop") is cls

    declare(MethodSpec("declared-toy", ToyOptions, groups=(), frozen_image_tower=True, module="nowhere"))
    try:
        class Restating(PromptModel):
            options = ToyOptions

        with pytest.raises(TypeError, match="states options, which its declaration"):
            register_method("declared-toy")(Restating)
        with pytest.raises(ModuleNotFoundError):
            method_class("declared-toy")  # the model's module is imported on first use
    finally:
        unregister_method("declared-toy")


@pytest.mark.parametrize("method", ["zeroshot", "coop", "vpt-shallow", "vpt-deep", "vlp", "cavpt", "e2mim", "cocoop", "kgcoop", "prograd", "promptsrc", "ivlp", "maple"])
def test_declared_facts_match_the_model(method, tiny_clip):
    cls = METHODS[method]
    model = fastprompt.create_model(method, classnames=CLASSNAMES, clip=tiny_clip)
    assert cls.frozen_image_tower == (model.visual is None)
    groups = model.param_groups()  # raises if a trainable tensor is in no declared group
    trained = {name for _, members in groups for name, _ in members}
    assert trained == set(model.prompt_state_dict())
    assert {g.name for g, _ in groups} <= {g.name for g in cls.groups}
    assert model.wants_topk_table() == (method == "cavpt")
    options = model.resolved_options()
    rebuilt = fastprompt.create_model(method, classnames=CLASSNAMES, clip=tiny_clip, **options)
    assert rebuilt.resolved_options() == options and set(rebuilt.prompt_state_dict()) == trained


def test_cavpt_text_group_only_with_text_prompt(tiny_clip):
    groups = lambda **kw: [g.name for g, _ in fastprompt.create_model("cavpt", CLASSNAMES, clip=tiny_clip, **kw).param_groups()]
    assert groups() == ["visual", "cavpt"]
    assert groups(text_prompt=True) == ["text", "visual", "cavpt"]


def test_one_option_keyword_in_two_option_groups_is_refused():
    """kgcoop's `weight` and prograd's λ once shared the keyword `weight`: one flag would have been
    generated and the other silently lost. Two groups that declare one keyword are refused."""

    @dataclass
    class Clash(Options):
        flag_prefix: ClassVar[str] = "clash"

        n_ctx: int = 3  # the same keyword as CoOp's --coop.n-ctx

    declare(MethodSpec("clash", Clash, groups=(), frozen_image_tower=True, module="nowhere"))
    try:
        with pytest.raises(TypeError, match="option 'n_ctx' is declared by --coop.* and --clash.* options"):
            option_flags()
    finally:
        unregister_method("clash")
    assert any(fl.flag == "--prograd.projection-weight" for fl in option_flags())
    assert any(fl.flag == "--kgcoop.weight" for fl in option_flags())
