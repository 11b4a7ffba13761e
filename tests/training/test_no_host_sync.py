"""The training step reads nothing back to the host: an epoch's host reads do not grow with its
number of steps, for every trainable method (issue 15 §2).

A host read (`Tensor.item`, `bool`, `float`, `int`, `__index__`, `tolist`, `cpu`, `numpy`) of a
CUDA tensor waits for the GPU: once per step it stalls the pipeline and breaks CUDA graphs. On
CPU the same calls are counted by wrapping them on `torch.Tensor`; an epoch of 2 steps and one
of 6 steps must make the same number (the trainer reads its running sums once per epoch).
The batches are synthetic tensors fed in place of the loader's, so the count is the step's and
the epoch accounting's, not the data pipeline's. Reads inside torch's C++ (a boolean-mask
index, `bincount`) are invisible here; `tests/training/test_compiled.py` catches those as
graph breaks of the compiled step (fullgraph).
"""

from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from fastprompt.errors import FastpromptError
from fastprompt.training import TrainConfig, Trainer

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
BATCH = 4

METHODS = [
    ("coop", {}),
    ("vpt-shallow", {"n_prompts": 2}),
    ("vpt-deep", {"n_prompts": 2}),
    ("vlp", {"n_prompts": 2, "n_ctx": 4}),
    ("cavpt", {"n_prompts": 2, "topk": 3}),  # paper, eq. 10 targets, cached top-K
    ("cavpt", {"n_prompts": 2, "topk": 3, "aux_target": "gt-only", "topk_source": "online"}),
    ("cavpt", {"n_prompts": 2, "topk": 3, "variant": "released", "text_prompt": True, "n_ctx": 4, "guidance_epochs": 1}),
    ("e2mim", {"n_ctx": 4}),
    ("cocoop", {}),
    ("kgcoop", {}),
    ("prograd", {}),
    ("promptsrc", {}),
    ("ivlp", {}),
    ("maple", {}),
]


@contextmanager
def counting_host_reads():
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def make_trainer(demo_beton, tmp_path, method, options, **overrides):
    settings = dict(clip="fastprompt-tiny", pretrained=None, epochs=2, warmup_epochs=0, lr=0.01, batch_size=BATCH,
                    num_workers=1, device="cpu", compile="off")
    trainer = Trainer(TrainConfig(method=method, data=str(demo_beton), out=str(tmp_path / "run"), options=options,
                                  **{**settings, **overrides}))
    if trainer.cached_topk:  # CAVPT's cached top-K: any table will do for counting reads
        trainer._topk_table = torch.randint(0, len(trainer.classnames), (trainer.data.num_samples, trainer.model.k_n))
    return trainer


def synthetic_batches(trainer, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = trainer.model.bundle.image_size
    batches = []
    for _ in range(steps):
        images = torch.randn(BATCH, 3, size, size, generator=g)  # (B, 3, S, S)
        labels = torch.randint(0, len(trainer.classnames), (BATCH,), generator=g)  # (B,)
        indices = torch.randint(0, trainer.data.num_samples, (BATCH,), generator=g)  # (B,): .beton rows
        batches.append((images, labels, indices))
    return batches


def reads_in_epoch(trainer, steps: int, monkeypatch) -> Counter:
    monkeypatch.setattr(trainer, "_batches", lambda: synthetic_batches(trainer, steps))
    with counting_host_reads() as counts:
        line = trainer.train_epoch()
    assert line["images"] == steps * BATCH
    return counts


@pytest.mark.parametrize("method, options", METHODS, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={x}" for k, x in v.items() if k in ("variant", "aux_target")) or "default")
def test_host_reads_do_not_grow_with_steps(method, options, demo_beton, tmp_path, monkeypatch):
    trainer = make_trainer(demo_beton, tmp_path, method, options)
    few, many = reads_in_epoch(trainer, 2, monkeypatch), reads_in_epoch(trainer, 6, monkeypatch)
    trainer.close()
    assert few == many, f"{method}: 2 steps read {dict(few)}, 6 steps read {dict(many)}"
    assert sum(many.values()) <= 2, dict(many)  # one read of the running sums, one of the non-finite record


def test_counting_sees_a_per_step_read(demo_beton, tmp_path, monkeypatch):
    """The counter is not blind: a step that reads its loss (as the trainer once did) is caught."""
    trainer = make_trainer(demo_beton, tmp_path, "coop", {})
    step_fn = trainer.step_fn

    def reading_step(*args, **kwargs):
        terms, logits = step_fn(*args, **kwargs)
        float(terms["loss"].detach())
        return terms, logits

    trainer.step_fn = reading_step
    few, many = reads_in_epoch(trainer, 2, monkeypatch), reads_in_epoch(trainer, 6, monkeypatch)
    assert many["__float__"] - few["__float__"] == 4


def test_first_non_finite_step_is_reported_at_epoch_end(demo_beton, tmp_path, monkeypatch):
    """The non-finite check (--nan-policy stop) runs on the device and is read once per epoch: it
    names the first bad step, and the epoch writes nothing."""
    trainer = make_trainer(demo_beton, tmp_path, "coop", {})
    step_fn, calls = trainer.step_fn, []

    def poisoned_step(*args, **kwargs):
        terms, logits = step_fn(*args, **kwargs)
        calls.append(None)
        if len(calls) in (3, 5):  # steps 3 and 5 of 6
            terms = {**terms, "loss": terms["loss"] * float("inf")}
        return terms, logits

    trainer.step_fn = poisoned_step
    with pytest.raises(FastpromptError, match=r"loss became non-finite \(NaN or inf\) at epoch 1 step 3; no checkpoint was written yet"):
        reads_in_epoch(trainer, 6, monkeypatch)
    assert len(calls) == 6 and trainer.metrics == []
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def test_lr_is_a_device_tensor_changed_in_place_and_kept_by_resume(demo_beton, tmp_path, monkeypatch):
    """The fused optimiser reads each group's lr from one 0-d tensor for the whole run (a new lr
    is new data, not a new compiled graph); a resumed run keeps the tensors and the fused kernels."""
    trainer = make_trainer(demo_beton, tmp_path, "vlp", {"n_prompts": 2, "n_ctx": 4}, warmup_epochs=1, epochs=3)
    assert trainer.optimizer.defaults["fused"] is True
    tensors = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    for epoch in range(2):
        monkeypatch.setattr(trainer, "_batches", lambda: synthetic_batches(trainer, 2))
        line = trainer.train_epoch()
        trainer.epoch += 1
        trainer.metrics.append(line)  # as train() does: a checkpoint holds the metrics of its epochs
        for group in trainer.optimizer.param_groups:
            assert group["lr"] is tensors[group["name"]] and group["lr"].dtype == torch.float32
            assert float(group["lr"]) == pytest.approx(trainer.config.lr_at(group["name"], epoch), rel=1e-6)
            assert line["lr"][group["name"]] == trainer.config.lr_at(group["name"], epoch)
    assert trainer.config.lr_at("text", 0) != trainer.config.lr_at("text", 1)  # the lr did change
    trainer.save_checkpoint()
    momentum = {n: trainer.optimizer.state[p]["momentum_buffer"].clone() for n, p in trainer.model.named_parameters()
                if p.requires_grad}
    resumed = make_trainer(demo_beton, tmp_path, "vlp", {"n_prompts": 2, "n_ctx": 4}, warmup_epochs=1, epochs=3)
    assert resumed.epoch == 2
    for group in resumed.optimizer.param_groups:
        assert torch.is_tensor(group["lr"]) and group["fused"] is True
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(resumed.optimizer.state[p]["momentum_buffer"], momentum[name]), name


@pytest.mark.parametrize("method", ["coop", "e2mim", "prograd"])
def test_feature_cache_steps_read_nothing_either(method, demo_beton, tmp_path, monkeypatch):
    """The cached-features step (`--feature-cache`): batches of frozen features [B, D] in place of images."""
    trainer = make_trainer(demo_beton, tmp_path, method, {"n_ctx": 4})
    monkeypatch.setattr(trainer, "feature_cache", object())  # any non-None: the loop takes the features path
    dim = trainer.model.bundle.embed_dim

    def feature_batches(steps):
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(BATCH, dim, generator=g), torch.randint(0, len(trainer.classnames), (BATCH,), generator=g))
                for _ in range(steps)]

    counts = []
    for steps in (2, 6):
        monkeypatch.setattr(trainer, "_batches", lambda steps=steps: feature_batches(steps))
        with counting_host_reads() as reads:
            assert trainer.train_epoch()["images"] == steps * BATCH
        counts.append(reads)
    assert counts[0] == counts[1] and sum(counts[1].values()) <= 2, counts
