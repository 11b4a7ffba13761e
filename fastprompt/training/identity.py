"""Which settings of a run identify its result: the one rule, used wherever two runs (or a
planned run and a finished one) are compared.

A run's identity is its resolved config (`config.json`: every `TrainConfig` field plus the
run facts the trainer adds, such as class names, the CLIP weights id and the data's content
id, `data_id`) minus the fields
that choose *how* it executes and not *what* it computes: the output folder, the device,
loader workers, the decoded cache (the same batches), checkpoint frequency, compilation, the eval batch size, the fast/reference
backend (the same function by contract, docs/methods.md) and the process count (DDP gives the
result of one process). Validation (`eval_every`) only adds val accuracies to metrics.jsonl, so it
is an execution setting too, but under `final_model` best-val, where its epochs are the candidates
for the reported model; `final_model` itself is identity (another model is reported). `fastprompt sweep` uses it to decide whether a cell's folder holds
this cell; `fastprompt report` to refuse averaging runs that differ in more than the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

# Fields that change how a run executes, not its result: the one list.
EXECUTION_FIELDS = frozenset({
    "out", "device", "num_workers", "checkpoint_every", "compile", "compile_backend", "eval_batch_size",
    "backend", "world_size", "trust_pickle", "nan_policy", "decoded_cache",
})
# Identity fields left out at the value every run had before the field existed, so those runs, and
# their hashes and run names, stay the same run; where one side lacks the field it reads as that value
NEUTRAL = {"final_model": "last"}
# The same for method options added later: at this value the option is left out of the identity
NEUTRAL_OPTIONS = {"class_position": "end"}
# Fields that identify a result only under another field's value, (field, value): validation's epochs
# are the candidates of --final-model best-val; under last they change no reported number
IDENTITY_UNDER = {"eval_every": ("final_model", "best-val")}
# derived from the identity (the hash of it), never compared itself
DERIVED_FIELDS = ("identity_hash",)
# run facts that run directories of earlier versions lack: compared only where both configs have them
LATER_FACTS = ("autocast", "data_id")
_warned_no_checksum: set[str] = set()  # .beton files already warned about in this process (data_id)


def data_id(dataset) -> Optional[str]:
    """The content id of an opened .beton (config.json's `data_id`): the checksum its sidecar
    recorded when `fastprompt prepare` wrote it (`sha256:HEX` of the whole file), so a file
    prepared again at the same path is another run's data; read, never computed (the file may
    be gigabytes). None for a sidecar of an older fastprompt without one, said once."""
    recorded = dataset.meta.get("checksum")
    if recorded is None:
        key = str(Path(dataset.path).resolve())
        if key not in _warned_no_checksum:
            _warned_no_checksum.add(key)
            log.warning("%s records no checksum (prepared by an older fastprompt): a run cannot tell whether its content "
                        "changes; re-create it with `%s` to record one", dataset.path, dataset.prepare_command())
        return None
    return str(recorded)


def identity_hash(resolved: dict) -> str:
    """A short hash (12 hex digits) of the identity of a resolved config's `TrainConfig` fields:
    equal settings give equal hashes (run names, config.json's `identity_hash`)."""
    from fastprompt.training.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    ident = identity({k: v for k, v in resolved.items() if k in names})
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def identity(resolved: dict) -> dict:
    """The result-identifying part of a resolved config dict (a copy). Method options count
    as resolved values: an option left at its default equals the default written out."""
    ident = {k: v for k, v in resolved.items() if k not in EXECUTION_FIELDS and k not in DERIVED_FIELDS}
    for name, (other, value) in IDENTITY_UNDER.items():
        if ident.get(other, NEUTRAL.get(other)) != value:
            ident.pop(name, None)
    for name, neutral in NEUTRAL.items():
        if ident.get(name, neutral) == neutral:
            ident.pop(name, None)
    if isinstance(ident.get("options"), dict):
        ident["options"] = _resolved_options(ident.get("method"), ident["options"])
    return ident


def _resolved_options(method, options: dict) -> dict:
    from fastprompt.methods import METHODS, method_config

    if method not in METHODS:
        return dict(options)  # not a method of this version: compared as written
    resolved = method_config(method, **options).to_dict()
    return {k: v for k, v in resolved.items() if k not in NEUTRAL_OPTIONS or v != NEUTRAL_OPTIONS[k]}


def first_difference(expected: dict, saved: dict, ignore: tuple[str, ...] = (), both: bool = False
                     ) -> Optional[tuple[str, Any, Any]]:
    """The first identity field (in `expected`'s order) whose value differs between a planned
    config and a saved one, as (field, expected value, saved value); None when they agree.

    Only `expected`'s identity fields are compared: a saved config also holds run facts that
    the trainer derives from them (class names from data and classes, the weights id from clip
    and pretrained), which a planned config cannot know yet. A field the saved config lacks
    is a difference (its saved value reads as `<missing>`), but for `LATER_FACTS`, which older
    run directories do not record. With `both`, the fields of both
    configs are compared (two saved runs). Values compare as JSON (a tuple equals a list).
    An option the model derives when it is built (`DERIVED_OPTIONS`: n_ctx from ctx_init) that
    the expected config leaves None takes the saved value: the trainer compares it."""
    mine, theirs = (json.loads(json.dumps(identity(d))) for d in (expected, saved))
    keys = list(mine) + [k for k in theirs if k not in mine and (both or k in NEUTRAL or k in IDENTITY_UNDER)]
    for key in keys:
        if key in ignore or key in DERIVED_FIELDS or (key in LATER_FACTS and not (key in mine and key in theirs)):
            continue
        value, other = mine.get(key, NEUTRAL.get(key, "<missing>")), theirs.get(key, NEUTRAL.get(key, "<missing>"))
        if key == "options" and isinstance(value, dict) and isinstance(other, dict):
            from fastprompt.methods.options import DERIVED_OPTIONS

            value = {k: other.get(k, v) if v is None and k in DERIVED_OPTIONS else v for k, v in value.items()}
            neutral = lambda d, o: {**{k: v for k, v in NEUTRAL_OPTIONS.items() if k in o}, **d}  # left out: neutral
            value, other = neutral(value, other), neutral(other, value)
        if other != value:
            if isinstance(value, dict) and isinstance(other, dict):  # name the option: options.n_ctx
                inner = first_difference(value, other, both=True)
                return f"{key}.{inner[0]}", inner[1], inner[2]
            return key, value, other
    return None


def without_seed(resolved: dict) -> dict:
    """The identity of a run with the seed and what follows from it removed: the seed, and the
    CLIP weights id when the weights are random (`pretrained` None: drawn from the seed). Runs
    that differ in nothing else are seeds of one experiment and may be averaged."""
    ident = identity(resolved)
    ident.pop("seed", None)
    if ident.get("pretrained") is None:
        ident.pop("weights_id", None)
    return ident


# ------------------------------------------------------------------ one recipe per report
# `fastprompt report` lays runs out on these axes (rows, columns, one table per value) and
# averages over the seed (`without_seed`); everything else is the recipe the report shows.
TABLE_AXES = ("method", "dataset", "shots", "classes")
# Identity fields that follow from table axes, and which: runs that agree on those axes agree on
# the field; runs on other axis values may differ in it. The dataset brings its file and that file's
# content id, its class names (all, or the base half) and its name; a method brings its own options
# and parameter groups.
FOLLOWS = {
    "method": ("method",), "dataset": ("dataset",), "shots": ("shots",), "classes": ("classes",),
    "data": ("dataset",), "data_id": ("dataset",), "classnames": ("dataset", "classes"),
    "options": ("method",), "group_lr": ("method",), "group_warmup_epochs": ("method",),
}
# Identity fields that resolution fills in from the axes when a run leaves them unset
# (`TrainConfig.from_protocol` and `fastprompt.training.plan.plan_run`): CoOp's epochs by shots (ImageNet 50) or
# the protocol's, the dataset's template, each group's lr and warm-up (ImageNet's 1 epoch) and each
# method option (CAVPT's K_N) at the protocol's value for the dataset or the default. Across axis
# values they agree when every run holds one value, or when every run holds what resolution gives
# on its own axes: EuroSAT's 200 epochs and ImageNet's 50 agree, EuroSAT's 200 and DTD's
# `--epochs 100` do not. Every field in neither table (weights, lr, batch size, optimiser, momentum,
# weight decay, precision and autocast, feature cache, protocol, ...) is one value in every run.
RESOLVED = ("epochs", "template", "group_lr", "group_warmup_epochs", "options")
_UNSET = "<unset>"


def resolved_defaults(saved: dict, dataset: str, axes_options: tuple[str, ...] = ()) -> dict:
    """The `RESOLVED` fields of a saved run as resolution gives them on its own method, dataset
    (the sidecar's name) and shots when the run leaves them unset: its protocol's values there,
    else the defaults; the method options `axes_options` (a report's rows) are taken as the run
    set them, so what they decide (CAVPT's variant: its aux_target) resolves on them too. {}
    when this version cannot resolve the run (a method or protocol it lacks, settings it
    refuses): its values then count as set explicitly."""
    from fastprompt.data.datasets import default_template
    from fastprompt.errors import FastpromptError
    from fastprompt.methods import method_config, method_spec
    from fastprompt.training.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    asked = {"out": "", **{k: v for k, v in saved.items() if k in names and k not in RESOLVED and k != "protocol"}}
    saved_options = saved.get("options") if isinstance(saved.get("options"), dict) else {}
    asked["options"] = {k: saved_options[k] for k in axes_options if k in saved_options}
    try:
        request = (TrainConfig.from_protocol(saved["protocol"], dataset=dataset, **asked) if saved.get("protocol")
                   else TrainConfig(**asked))
        options = method_config(request.method, **request.options)
        resolved = request.resolve(dataset, method_spec(request.method).trained_groups(options), options.to_dict())
    except (FastpromptError, TypeError):
        return {}
    return {"epochs": resolved.epochs, "template": resolved.template or default_template(dataset),
            "group_lr": resolved.group_lr, "group_warmup_epochs": resolved.group_warmup_epochs, "options": resolved.options}


def recipe_difference(runs: list[tuple[str, dict, dict]], axes_options: tuple[str, ...] = ()
                      ) -> Optional[tuple[str, str, str, Any, Any]]:
    """The first identity field in which runs of one report differ beyond the seed, `FOLLOWS` and
    `RESOLVED`, as (field, run, other run, its value, the other's); None when they are one recipe.
    `runs`: (name, axes {TABLE_AXES: value}, saved config). Options and group recipes are compared
    one by one (`options.topk`, `group_lr.visual`). The method options `axes_options` are axes of
    the report as well (`--rows method,cavpt.variant`): they may differ, and so may what
    resolution derives from them."""
    entries: dict[tuple, list] = {}  # (field, axis values it follows) -> [(run, value, resolved default)]
    views = [(name, axes, json.loads(json.dumps(without_seed(config))),
              json.loads(json.dumps(resolved_defaults(config, axes["dataset"], axes_options))))
             for name, axes, config in runs]
    fields = list(dict.fromkeys(k for _, _, ident, _ in views for k in ident if k not in DERIVED_FIELDS))
    for field in fields:
        for name, axes, ident, defaults in views:
            if field in LATER_FACTS and field not in ident:
                continue  # an earlier version's run does not record it
            key = tuple(axes[a] for a in FOLLOWS.get(field, ()))
            value, default = ident.get(field, NEUTRAL.get(field, "<missing>")), defaults.get(field, _UNSET)
            if field in RESOLVED and isinstance(value, dict):
                for sub, v in value.items():
                    d = default.get(sub, _UNSET) if isinstance(default, dict) else _UNSET
                    entries.setdefault((f"{field}.{sub}", key), []).append((name, v, d))
            else:
                entries.setdefault((field, key), []).append((name, value, default))
    for (field, _), group in entries.items():
        if all(v == group[0][1] for _, v, _ in group):
            continue  # one value
        if field.split(".")[0] in RESOLVED and all(v == d for _, v, d in group):
            continue  # each as resolved on its own axes
        first = next((e for e in group if e[1] != e[2]), group[0]) if field.split(".")[0] in RESOLVED else group[0]
        other = next(e for e in group if e[1] != first[1])
        return field, first[0], other[0], first[1], other[1]
    return None
