"""Packed training (fastprompt.training.pack): N runs stepped as one equal N solo runs, each
run's loss moves only its own prompts, a run that goes non-finite fails alone, the methods that
pack say so, and `--pack auto` follows its measurements."""

import copy

import pytest
import torch
from _util import CLASSNAMES, oracle_errors, reference_copy

from fastprompt.errors import FastpromptError
from fastprompt.methods import create_model, list_methods, method_class, method_spec
from fastprompt.methods.base import PromptModel
from fastprompt.methods.coop import Coop
from fastprompt.training.pack import (OBJECTIVE_HOOKS, Pack, auto_pack_size, packed_logits, packed_loss,
                                      packed_text_features, probe_step, step_memory)

RUNS, BATCH, STEPS = 3, 4, 3
PACKED_METHODS = {"coop", "kgcoop", "vpt-shallow", "vpt-deep", "vlp", "ivlp"}


def _runs(tiny_clip, method, backend="fast", runs=RUNS, **options):
    """`runs` models of `method` on one shared CLIP, each with its own prompt initialisation."""
    models = []
    for n in range(runs):
        torch.manual_seed(100 + n)
        models.append(create_model(method, CLASSNAMES, clip=tiny_clip, pretrained=None, backend=backend, **options))
    return models


def _sgd(model):
    """The trainer's optimiser settings (SGD, momentum 0.9, weight decay 5e-4)."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                           weight_decay=5e-4)


def _batches(steps=STEPS, runs=RUNS, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return [([torch.randn(BATCH, 3, 64, 64, generator=g, dtype=dtype) for _ in range(runs)],
             [torch.randint(0, len(CLASSNAMES), (BATCH,), generator=g) for _ in range(runs)]) for _ in range(steps)]


def _solo_steps(model, batches, run):
    """Run `run` alone (`model.loss_and_logits`, backward, SGD): its loss at every step."""
    optimizer = _sgd(model)
    losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = model.loss_and_logits(images[run].to(next(model.parameters()).dtype), labels[run])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


slow = pytest.mark.slow
CASES = [
    pytest.param("coop", "fast", {}, id="coop"),
    pytest.param("coop", "reference", {}, id="coop-reference", marks=slow),
    pytest.param("coop", "fast", {"csc": True}, id="coop-csc", marks=slow),  # N·K class-specific prompts
    pytest.param("vpt-deep", "fast", {}, id="vpt-deep"),
    pytest.param("vpt-deep", "reference", {}, id="vpt-deep-reference", marks=slow),
    pytest.param("vpt-deep", "fast", {"vision_depth": 2, "placement": "before-ln-pre"}, id="vpt-deep-carried",
                 marks=slow),  # each run's slots carried above layer 2
    pytest.param("vpt-shallow", "fast", {}, id="vpt-shallow", marks=slow),
    pytest.param("vlp", "fast", {"text_depth": 2}, id="vlp-deep-text", marks=slow),  # each run's deep text context
    pytest.param("kgcoop", "fast", {}, id="kgcoop", marks=slow),  # its own objective: CE + the knowledge gap
]


@pytest.mark.parametrize("method,backend,options", CASES)
def test_packed_equals_solo(tiny_clip, method, backend, options):
    """Each packed run's loss at every step agrees with its solo run's within 1e-5 relative (the
    issue's bound), and its prompts after the steps are as close to a float64 solo run's as the
    fp32 solo run's are (10x its error + 1e-6 relative: tests/_util.py's oracle rule)."""
    models = _runs(tiny_clip, method, backend, **options)
    initial = copy.deepcopy(models)  # one deep copy: the copies share their CLIP copy
    oracles = [reference_copy(m, torch.float64) for m in models]
    batches = _batches()
    pack = Pack(models, [_sgd(m) for m in models])
    pack.start_epoch()
    packed = [pack.step(images, labels, step).tolist() for step, (images, labels) in enumerate(batches)]
    for run in range(RUNS):
        solo = _solo_steps(initial[run], batches, run)
        for step in range(STEPS):
            assert abs(packed[step][run] - solo[step]) <= 1e-5 * abs(solo[step]), (run, step, packed[step][run], solo[step])
        _solo_steps(oracles[run], [([x.double() for x in images], labels) for images, labels in batches], run)
        want = oracles[run].prompt_state_dict()
        noise = oracle_errors(initial[run].prompt_state_dict(), want)
        for name, error in oracle_errors(models[run].prompt_state_dict(), want).items():
            assert error <= 10 * noise[name] + 1e-6, (run, name, error, noise[name])
    lines = pack.end_epoch()
    assert [line.run for line in lines] == list(range(RUNS)) and not any(line.failed for line in lines)
    assert [line.images for line in lines] == [STEPS * BATCH] * RUNS
    for run, line in enumerate(lines):
        assert line.loss == pytest.approx(sum(step[run] for step in packed) / STEPS, rel=1e-6)


@pytest.mark.parametrize("method", ["coop", "vpt-deep"])
def test_each_runs_loss_moves_only_its_prompts(tiny_clip, method):
    """The gradient of run 0's loss reaches run 0's prompts only, and another run's prompts do
    not change run 0's loss or logits (not one bit)."""
    models = _runs(tiny_clip, method)
    images, labels = _batches(steps=1)[0]
    losses, logits = packed_loss(models, torch.stack(images), torch.stack(labels))
    losses[0].backward()
    for run, model in enumerate(models):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        if run == 0:
            assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)
        else:
            assert all(g is None or not bool(g.any()) for g in grads), run
    with torch.no_grad():
        for p in (p for p in models[1].parameters() if p.requires_grad):
            p.add_(torch.randn_like(p))  # (a constant shift would be lost in LayerNorm)
    again, logits_again = packed_loss(models, torch.stack(images), torch.stack(labels))
    assert torch.equal(again[0], losses[0]) and torch.equal(logits_again[0], logits[0])
    assert not torch.equal(again[1], losses[1])


@pytest.mark.parametrize("policy", ["stop", pytest.param("skip", marks=pytest.mark.slow)])
def test_a_nonfinite_run_fails_alone(tiny_clip, policy):
    """Run 1's prompts hold a NaN: its epoch is reported failed (stop: its first bad step; skip:
    every step skipped, its optimiser never stepped), the pack drops it, and runs 0 and 2 trained
    as they do alone and go on training."""
    models = _runs(tiny_clip, "vpt-deep")
    with torch.no_grad():
        models[1].visual.prompts[0, 0, 0] = float("nan")
    initial = copy.deepcopy(models)
    optimizers = [_sgd(m) for m in models]
    pack = Pack(models, optimizers, nan_policy=policy)
    batches = _batches()
    pack.start_epoch()
    for step, (images, labels) in enumerate(batches):
        losses = pack.step(images, labels, step)
        assert torch.isfinite(losses[[0, 2]]).all() and not torch.isfinite(losses[1])
    lines = pack.end_epoch()
    assert [line.failed for line in lines] == [False, True, False]
    if policy == "stop":
        assert lines[1].bad_step == 1 and "non-finite (NaN or inf) at epoch 1 step 1" in lines[1].failure(1)
    else:
        assert lines[1].skipped_all and lines[1].skipped_steps == STEPS and lines[1].images == 0
        assert not optimizers[1].state  # never stepped: no momentum
        assert "was skipped" in lines[1].failure(1)
    assert lines[0].failure(1) is None and lines[0].images == STEPS * BATCH
    for run in (0, 2):
        _solo_steps(initial[run], batches, run)
        for name, p in models[run].prompt_state_dict().items():
            assert torch.allclose(p, initial[run].prompt_state_dict()[name], rtol=0, atol=1e-6), (run, name)
    assert pack.active == [0, 2]
    images, labels = _batches(steps=1, runs=2)[0]
    pack.start_epoch()
    assert pack.step(torch.stack(images), torch.stack(labels), 0).shape == (2,)  # one tensor a pack: no copy
    with pytest.raises(ValueError, match="one batch per active run"):
        pack.step(*_batches(steps=1)[0], 0)


def test_the_methods_that_pack_say_so():
    """`MethodSpec.packs` is declared for the methods of the base forward, and every method that
    declares it computes what the pack computes (overrides none of its hooks; `objective` may)."""
    assert {name for name in list_methods() if method_spec(name).packs} == PACKED_METHODS
    for name in PACKED_METHODS:
        cls = method_class(name)
        assert [h for h in OBJECTIVE_HOOKS if getattr(cls, h) is not getattr(PromptModel, h)] == [], name


def test_a_pack_refuses_what_it_cannot_step(tiny_clip):
    """A method that does not declare packs, one that declares it but overrides the objective,
    and runs that differ in options or CLIP are refused with the reason."""
    with pytest.raises(FastpromptError, match="cocoop does not declare that its runs pack"):
        Pack(_runs(tiny_clip, "cocoop", runs=2), [None, None])

    class LossOfItsOwn(Coop):
        def loss_and_logits(self, images, labels, features=None):
            return super().loss_and_logits(images, labels, features)

    torch.manual_seed(0)
    own = LossOfItsOwn(_runs(tiny_clip, "coop", runs=1)[0].bundle, CLASSNAMES, ("a photo of a {}.",), "fast",
                       method_spec("coop").options())
    with pytest.raises(TypeError, match="overrides loss_and_logits"):
        Pack([own], [None])
    mixed = _runs(tiny_clip, "coop", runs=1) + [create_model("coop", CLASSNAMES, clip=tiny_clip, pretrained=None, n_ctx=4)]
    with pytest.raises(FastpromptError, match="run 1 of the pack has options"):
        Pack(mixed, [None, None])
    other_clip = _runs(tiny_clip, "coop", runs=1) + _runs(copy.deepcopy(tiny_clip), "coop", runs=1)
    with pytest.raises(FastpromptError, match="run 1 of the pack has another CLIP instance"):
        Pack(other_clip, [None, None])


@pytest.mark.slow
def test_a_compiled_pack_equals_the_eager_pack(tiny_clip):
    """With a compile mode the packed step runs compiled (aot_eager here: the CPU suite has no
    Triton) and gives the eager pack's losses."""
    models = _runs(tiny_clip, "coop")
    eager = copy.deepcopy(models)
    compiled = Pack(models, [_sgd(m) for m in models], compile_mode="default", compile_backend="aot_eager")
    plain = Pack(eager, [_sgd(m) for m in eager])
    assert "torch.compile default" in compiled.execution and "eager" in plain.execution
    for step, (images, labels) in enumerate(_batches()):
        assert torch.allclose(compiled.step(images, labels, step), plain.step(images, labels, step), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ --pack auto
class _Probe:
    """A probe step whose memory is `per_run` bytes of saved activations a run and whose time
    (on a fake clock) is `seconds(n)`."""

    def __init__(self, per_run, seconds):
        self.per_run, self.seconds, self.now, self.calls = per_run, seconds, 0.0, []

    def __call__(self, n):
        self.calls.append(n)
        x = torch.ones(n * self.per_run // 4, requires_grad=True)  # float32: per_run bytes a run
        (x * x).sum().backward()  # mul saves x: n·per_run bytes
        self.now += self.seconds(n)

    def clock(self):
        return self.now


@pytest.mark.parametrize("seconds,runs,available,want", [
    (lambda n: 1.0, 8, 5 * 4000 / 0.8, 5),  # a step of n runs takes as long as one: as many as fit (5)
    (lambda n: 1.0, 3, 5 * 4000 / 0.8, 3),  # ... but no more than the runs there are
    (lambda n: float(n), 8, 5 * 4000 / 0.8, 5),  # n runs take n times as long: steps at parity, the pack shares the rest
    (lambda n: n ** 1.2, 8, 5 * 4000 / 0.8, 1),  # packed steps slower than one after another: nothing gained
    (lambda n: 1.0, 8, 1.5 * 4000 / 0.8, 1),  # one run fits
    (lambda n: 1.0, 1, 1e12, 1),  # one run
])
def test_auto_pack_size_follows_memory_and_gain(seconds, runs, available, want):
    probe = _Probe(4000, seconds)
    choice = auto_pack_size(probe, runs, torch.device("cpu"), available=int(available), clock=probe.clock)
    assert choice.size == want, choice.line()
    assert choice.line().startswith(f"--pack auto: {want} run")


def test_step_memory_grows_with_the_runs_of_a_prompted_tower(tiny_clip):
    """On CPU the measured memory of a packed vpt-deep step is its saved activations: more runs,
    more bytes (what `auto` divides the available memory by); a machine with room for one run
    gets packs of one, without a timing."""
    models = _runs(tiny_clip, "vpt-deep", runs=2)
    images, labels = _batches(steps=1, runs=1)[0]
    probe = probe_step(models, images[0], labels[0])
    cpu = torch.device("cpu")
    one, two, four = (step_memory(probe, n, cpu) for n in (1, 2, 4))
    assert 0 < one < two < four and four - two == pytest.approx(2 * (two - one), rel=0.1)
    assert all(p.grad is None for m in models for p in m.parameters())  # the probe trains nothing
    choice = auto_pack_size(probe, 8, cpu, available=int((one + (two - one) // 2) / 0.8))
    assert choice.size == 1 and choice.reason.startswith("memory:") and "fits one run" in choice.reason


@pytest.mark.parametrize("method", ["coop", "vpt-deep"])
def test_packed_evaluation_equals_each_model(tiny_clip, method):
    """Evaluation logits of a pack on one test batch: run n's equal `models[n](images)` (a frozen
    tower encodes the batch once for all runs; the class features computed once may be passed)."""
    models = _runs(tiny_clip, method)
    for m in models:
        m.eval()
    images = _batches(steps=1, runs=1)[0][0][0]  # (B, 3, 64, 64)
    with torch.no_grad():
        want = torch.stack([m(images) for m in models])  # (N, B, K)
        text = packed_text_features(models)
    for got in (packed_logits(models, images), packed_logits(models, images, text=text)):
        assert got.shape == (RUNS, BATCH, len(CLASSNAMES))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cached_features_pack_as_images_do(tiny_clip):
    """A frozen tower's cached features (the feature cache) in place of images: each run's loss
    is its solo `loss_and_logits(None, labels, features=...)`."""
    models = _runs(tiny_clip, "coop")
    g = torch.Generator().manual_seed(3)
    features = torch.randn(RUNS, BATCH, models[0].bundle.embed_dim, generator=g)  # (N, B, D)
    labels = torch.randint(0, len(CLASSNAMES), (RUNS, BATCH), generator=g)
    losses, logits = packed_loss(models, None, labels, features=features)
    for n, model in enumerate(models):
        loss, solo_logits = model.loss_and_logits(None, labels[n], features=features[n])
        assert losses[n].item() == pytest.approx(loss.item(), rel=1e-6)
        assert torch.allclose(logits[n], solo_logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(FastpromptError, match="vpt-deep prompts its image tower; it needs images"):
        packed_loss(_runs(tiny_clip, "vpt-deep", runs=2), None, labels[:2], features=features[:2])
