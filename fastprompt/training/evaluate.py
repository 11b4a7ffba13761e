"""Evaluation: accuracy on a split, prompts moved to other classes, saved runs, zero-shot CLIP."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fastprompt.data import open_dataset
from fastprompt.errors import FastpromptError, one_line
from fastprompt.files import write_json
from fastprompt.methods import create_model
from fastprompt.methods.base import PromptModel
from fastprompt.runtime import autocast_for, resolve_device, seed_everything
from fastprompt.training.runfiles import check_evaluation, class_results, eval_file, finished_run_config

log = logging.getLogger(__name__)


class ResultNotSaved(FastpromptError):
    """An evaluation that ran, whose record could not be written (a read-only run folder, a
    full disk): `result` holds what it computed, so a caller can still show it."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


@torch.no_grad()
def confusion(model: PromptModel, loader, num_classes: int, *, autocast=nullcontext) -> torch.Tensor:
    """The confusion matrix [K, K] (int64, on the CPU; rows: true class, columns: predicted) of
    `model` over the (images, labels) batches of `loader`, in eval mode.

    Counted on the device (one bincount a batch) and read once at the end; under
    torch.distributed each rank counts its shard and the matrices are summed."""
    model.eval()
    device = model.clip.logit_scale.device
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)  # (K*K,)
    with autocast():
        for images, labels in loader:
            predicted = model(images).argmax(-1)  # (B,)
            counts += torch.bincount(labels.to(device) * num_classes + predicted, minlength=num_classes * num_classes)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts.view(num_classes, num_classes).cpu()  # (K, K): the one CPU-GPU sync


def evaluate_confusion(model: PromptModel, data, split: str, classes: str, *, device, batch_size: int = 128,
                       num_workers: Optional[int] = None, autocast=nullcontext, shots: Optional[int] = None,
                       seed: int = 1) -> torch.Tensor:
    """The confusion matrix [K, K] of `model` on `split` of `data` restricted to `classes`
    (centre crop; the model's class list, in its order). `shots`/`seed`: the few-shot subset of
    train or val a run with them draws (val: min(shots, 4) per class, Dassl's); None: the whole split."""
    loader = data.loader(split, shots=shots, seed=seed, classes=classes, train=False,
                         image_size=model.bundle.image_size, batch_size=batch_size, device=device,
                         num_workers=num_workers, drop_last=False)
    return confusion(model, loader, len(model.classnames), autocast=autocast)


def evaluate(model: PromptModel, data, split: str, classes: str, *, device, batch_size: int = 128,
             num_workers: Optional[int] = None, autocast=nullcontext) -> float:
    """Top-1 accuracy (%) of `model` on `split` of `data` restricted to `classes` (centre crop).

    The model's text features are computed once for the whole evaluation (eval mode, no grad).
    Under torch.distributed each rank scores its shard and the counts are summed.
    """
    counts = evaluate_confusion(model, data, split, classes, device=device, batch_size=batch_size,
                                num_workers=num_workers, autocast=autocast)
    return class_results(counts.tolist(), list(model.classnames))["accuracy"]


def model_for_classes(model: PromptModel, classnames: list[str], template=None) -> PromptModel:
    """The same method, CLIP and prompts, on another class list (base-to-new, cross-dataset)."""
    other = create_model(model.method, classnames, clip=model.clip, template=template or list(model.templates),
                         backend=model.backend, device=model.clip.logit_scale.device, **model.config.to_dict())
    other.load_prompt_state_dict(model.prompt_state_dict(), other_classes=True)
    return other


def _read_run(run_dir: Path) -> tuple[dict, dict]:
    """A finished run's config.json (checked, `runfiles.read_run_config`) and prompts (every tensor finite)."""
    prompts_path = run_dir / "prompts.safetensors"
    saved = finished_run_config(run_dir)
    try:
        prompts = load_file(str(prompts_path))
    except Exception as err:
        reason = one_line(err)
        raise FastpromptError(f"{run_dir} holds an unreadable run ({reason}); train it again with "
                              f"`fastprompt train ... --out {run_dir} --restart`") from None
    for name, tensor in prompts.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FastpromptError(f"{prompts_path} holds NaN or inf in tensor {name} (the run diverged, or the file is "
                                  f"damaged); train it again with `fastprompt train ... --out {run_dir} --restart`, "
                                  "with a lower --lr if it diverged")
    return saved, prompts


def _run_model(saved: dict, prompts: dict, classnames: list[str], template, device: torch.device,
               trust_pickle: bool = False) -> PromptModel:
    """The run's method, CLIP and options (all from config.json) on `classnames`, its prompts loaded
    (training-only tensors left out when the classes are not the run's)."""
    seed_everything(int(saved["seed"]))  # the same random CLIP weights as the run when --pretrained none
    model = create_model(saved["method"], classnames, clip=saved["clip"], pretrained=saved["pretrained"],
                         template=template, backend=saved.get("backend", "fast"), device=device, trust_pickle=trust_pickle,
                         **saved["options"])
    if model.bundle.weights_id != saved["weights_id"]:
        raise FastpromptError(
            f"the CLIP weights ({model.bundle.weights_id}) differ from those the run trained with ({saved['weights_id']}); "
            "use the same --clip/--pretrained files as the run"
        )
    other = list(classnames) != list(saved["classnames"])
    model.load_prompt_state_dict({k: v.to(device) for k, v in prompts.items()}, other_classes=other)
    return model.eval()


def load_run(run_dir: str, device: str = "cpu", trust_pickle: bool = False) -> PromptModel:
    """The trained model of a finished `fastprompt train` run, rebuilt from its directory alone:
    config.json (method, CLIP, every option, classes, template) and prompts.safetensors."""
    saved, prompts = _read_run(Path(run_dir))
    return _run_model(saved, prompts, saved["classnames"], saved["template"], resolve_device(device), trust_pickle)


def evaluate_run(run_dir: str, data: str, classes: str = "all", *, device: str = "auto", precision: str = "auto",
                 batch_size: int = 128, num_workers: Optional[int] = None, template: Optional[str] = None,
                 trust_pickle: bool = False) -> dict:
    """Evaluate a finished run's prompts on the test split of `data` (any dataset, any classes)."""

    check_evaluation(run_dir, data, classes, device, precision)  # the bad-input checks, torch-free (the CLI's first)
    dev = resolve_device(device)
    run = Path(run_dir)
    saved, prompts = _read_run(run)
    ds = open_dataset(data)
    classnames = ds.classnames_for(classes)
    template = template or (saved["template"] if saved.get("template") and saved["classnames"] == classnames
                            else ds.template)
    model = _run_model(saved, prompts, classnames, template, dev, trust_pickle)
    counts = evaluate_confusion(model, ds, "test", classes, device=dev, batch_size=batch_size, num_workers=num_workers,
                                autocast=autocast_for(precision, dev))
    scores = class_results(counts.tolist(), classnames)
    result = {"run": str(run), "method": saved["method"], "dataset": ds.name, "data": str(Path(ds.path).resolve()),
              "classes": classes, "test_accuracy": scores.pop("accuracy"), **scores}
    path = eval_file(run, ds.name, ds.path, classes)
    try:
        write_json(path, result)
    except OSError as err:
        raise ResultNotSaved(f"could not write {path} ({err.strerror or err}), so `fastprompt report` will not see this "
                             f"result; make {run} writable (or copy the run to a writable folder) and evaluate again",
                             result) from None
    return result


def zeroshot_eval(data: str, *, clip: str = "ViT-B-32", pretrained: Optional[str] = "openai", template: Optional[str] = None,
                  classes: str = "all", device: str = "auto", precision: str = "auto", batch_size: int = 128,
                  num_workers: Optional[int] = None, seed: int = 1, trust_pickle: bool = False) -> dict:
    """Zero-shot CLIP accuracy on the test split of `data`."""

    ds = open_dataset(data)
    classnames = ds.classnames_for(classes)
    dev = resolve_device(device)
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    seed_everything(seed)
    model = create_model("zeroshot", classnames, clip=clip, pretrained=pretrained, template=template or ds.template,
                         device=dev, trust_pickle=trust_pickle)
    acc = evaluate(model, ds, "test", classes, device=dev, batch_size=batch_size, num_workers=num_workers,
                   autocast=autocast_for(precision, dev))
    return {"method": "zeroshot", "dataset": ds.name, "classes": classes, "clip": clip,
            "pretrained": pretrained, "test_accuracy": acc}
