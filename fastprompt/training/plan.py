"""Plan, then execute: one function turns a run's request into a `RunPlan`, the engine runs plans.

A request is what a command line (`fastprompt train`), a sweep cell or a library caller asks
for: `TrainConfig` fields, some given explicitly, the rest left to a `--protocol` or to the
defaults. `plan_run` resolves it once, torch-free (the dataset's sidecar, not its tables):

- the recipe (`fastprompt.training.config.resolve_recipe`): epochs, every trained group's lr
  and warm-up, every method option, the dataset's template, `data` and a `pretrained` file as
  absolute paths;
- the data facts from the sidecar: the dataset's name, its content id (`data_id`), the class
  names the run trains on, the few-shot draw's coordinates (`Draw`: shots, seed, classes);
- the identity hash (`fastprompt.training.identity`) and the run directory (`--out`, or the
  default one under runs/ named by the setting and that hash);
- where each value came from (`sources`): "cli" (given explicitly: a flag, a sweep's setting,
  a library argument), "protocol" (the `--protocol`'s table), "dataset" (the dataset's own
  value: its template, ImageNet's epochs and warm-up) or "default" (the field's, the group's
  or the method option's default).

The engine (`fastprompt.training.trainer`) executes plans and resolves nothing: a run's
config.json is the plan's config plus the facts only the built model and device know (the
CLIP weights' id, the image size, bf16 or fp32, and the options the model derives, such as
CoOp's n_ctx from its init phrase). `fastprompt train` is a pack of one plan; `--seeds` a
list of them; a sweep plans every cell up front (`fastprompt.sweep.grid`) and sends each
worker its plan (`RunPlan.to_dict`), not a request to resolve again.

Which plans may train together, packed (`pack_key`, `pack_groups`: `--pack off|auto|N`), is
decided here too, torch-free, so a sweep groups its cells before it starts a worker; packing
is execution only (`fastprompt.training.engine`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from fastprompt.errors import FastpromptError
from fastprompt.training.config import TrainConfig, resolve_recipe
from fastprompt.training.identity import data_id, identity_hash
from fastprompt.training.rundir import MODES, check_out, holds_run
from fastprompt.validation import require

SOURCES = ("cli", "protocol", "dataset", "default")  # where a planned value came from (module docstring)
_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(TrainConfig)
             if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@dataclass(frozen=True)
class Draw:
    """The coordinates of a run's few-shot draw (Dassl's: `BetonDataset.fewshot_record`); the
    engine reads the files from the dataset's tables, which need torch."""

    shots: Optional[int]  # images per class; None: every training image
    seed: int
    classes: str  # "all" or "base"


@dataclass(frozen=True)
class RunPlan:
    """Every value a run depends on, resolved once (`plan_run`); what the engine executes."""

    config: TrainConfig  # the resolved settings: config.json's, less the options the built model derives
    dataset: str  # the sidecar's dataset name
    data_id: Optional[str]  # the .beton's content id (its sidecar's checksum; None: an older sidecar)
    classnames: tuple[str, ...]  # the classes the run trains on, in label order
    identity_hash: str  # `identity.identity_hash` of `config`: config.json's, results.json's, the run name's
    sources: Mapping[str, str] = field(default_factory=dict)  # value -> one of SOURCES ("epochs", "lr.text", "options.n_ctx")
    mode: str = "auto"  # auto: continue this setting's run; resume: insist on a checkpoint; restart: replace the run

    def __post_init__(self) -> None:
        require(self.mode in MODES, f"mode={self.mode!r} must be one of {', '.join(MODES)}")
        bad = {k: v for k, v in self.sources.items() if v not in SOURCES}
        require(not bad, f"sources={bad!r}: each must be one of {', '.join(SOURCES)}")
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def draw(self) -> Draw:
        return Draw(self.config.shots, self.config.seed, self.config.classes)

    def expected(self) -> dict:
        """What a run directory of this plan must hold, to compare with its config.json
        (`identity.first_difference`): the resolved settings and the data's content id."""
        return {**self.config.to_dict(), "data_id": self.data_id}

    def with_(self, **changes: Any) -> "RunPlan":
        """This plan with execution settings changed (`mode`, or config fields that are not identity:
        `out`, `num_workers`, `device`, ...); an identity field is refused (it would be another run)."""
        from fastprompt.training.identity import EXECUTION_FIELDS

        fields = {k: v for k, v in changes.items() if k != "mode"}
        identity = sorted(set(fields) - EXECUTION_FIELDS)
        require(not identity, f"{', '.join(identity)} decide what the run computes; plan the run again instead")
        config = dataclasses.replace(self.config, **fields) if fields else self.config
        return dataclasses.replace(self, config=config, mode=changes.get("mode", self.mode))

    def lines(self) -> list[str]:
        """The plan as the run prints it at its start: each resolved value that has a source, with it."""
        values = {"epochs": self.config.epochs, "template": self.config.template}
        values.update({f"lr.{g}": v for g, v in self.config.group_lr.items()})
        values.update({f"warmup_epochs.{g}": v for g, v in self.config.group_warmup_epochs.items()})
        values.update({f"options.{k}": v for k, v in self.config.options.items()})
        values.update({k: getattr(self.config, k) for k in self.sources if k in _FIELDS and k not in values})
        return [f"{key} = {values[key]!r} ({self.sources[key]})" for key in values if key in self.sources]

    def to_dict(self) -> dict:
        """Plain data (JSON, pickles, crosses machines): a sweep worker's payload."""
        return {"config": self.config.to_dict(), "dataset": self.dataset, "data_id": self.data_id,
                "classnames": list(self.classnames), "identity_hash": self.identity_hash,
                "sources": dict(self.sources), "mode": self.mode}

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        """A plan written by `to_dict`, taken as it is: nothing is resolved again."""
        return cls(config=TrainConfig.from_dict(d["config"]), dataset=d["dataset"], data_id=d["data_id"],
                   classnames=tuple(d["classnames"]), identity_hash=d["identity_hash"], sources=d["sources"],
                   mode=d.get("mode", "auto"))


def request_sources(request: TrainConfig, given: Optional[Iterable[str]], dataset: str) -> dict[str, str]:
    """Where each field of `request` came from: "cli" for the names in `given` (a field, or
    `options.NAME`, `lr.GROUP`, `warmup_epochs.GROUP`), "protocol" for what its protocol sets on
    `dataset` (the method too, where the request gave none), else "default". `given` None (a
    library caller's TrainConfig): every field that differs from its default and from the
    protocol's value counts as given."""
    proto = None
    if request.protocol is not None:
        from fastprompt.training.protocols import get_protocol

        proto = get_protocol(request.protocol)
    from_proto = proto.train_fields(dataset) if proto is not None else {}
    proto_options = proto.options(dataset) if proto is not None else {}
    if proto is not None and proto.method is not None:
        from_proto["method"] = proto.method
    if given is None:
        given = {k for k in _FIELDS if k not in ("options", "group_lr", "group_warmup_epochs", "protocol")
                 and getattr(request, k) != _DEFAULTS.get(k, object()) and from_proto.get(k, object()) != getattr(request, k)}
        given |= {f"options.{k}" for k, v in request.options.items() if proto_options.get(k, object()) != v}
    given = set(given) | {f"lr.{g}" for g in request.group_lr} | {f"warmup_epochs.{g}" for g in request.group_warmup_epochs}
    sources = {}
    for name in _FIELDS:
        if name in ("options", "group_lr", "group_warmup_epochs"):
            continue
        sources[name] = "cli" if name in given else "protocol" if name in from_proto else "default"
    sources["protocol"] = "cli" if request.protocol is not None else "default"
    for name in request.options:
        sources[f"options.{name}"] = "cli" if f"options.{name}" in given else "protocol" if name in proto_options \
            else "default"
    sources.update({k: "cli" for k in given if k.startswith(("lr.", "warmup_epochs."))})
    return sources


def plan_run(request: TrainConfig, *, given: Optional[Iterable[str]] = None, dataset=None, mode: str = "auto"
             ) -> RunPlan:
    """The plan of `request`: every value resolved once (module docstring), checked torch-free.

    given: the names set explicitly (`request_sources`; None: those that differ from the
    defaults). dataset: the opened `request.data` if the caller has it (else its sidecar is
    read). An empty `out` becomes the default run directory (`default_run_dir`). The run
    folder itself is checked where the run is asked for (`check_request`)."""
    from fastprompt.data import open_dataset
    from fastprompt.methods import method_config, method_spec

    ds = open_dataset(request.data, tables=False) if dataset is None else dataset  # the sidecar: torch-free
    sources = request_sources(request, given, ds.name)
    options = method_config(request.method, **request.options)
    groups = method_spec(request.method).trained_groups(options)
    resolved, recipe = resolve_recipe(request, ds.name, groups, options.to_dict(), sources)
    sources.update(recipe)
    for name in resolved.options:
        sources.setdefault(f"options.{name}", "default")
    if resolved.template is None:
        sources["template"] = "dataset"
    pretrained = resolved.pretrained
    if isinstance(pretrained, str) and os.path.isfile(pretrained):
        pretrained = str(Path(pretrained).expanduser().resolve())
    config = dataclasses.replace(resolved, template=resolved.template or ds.template, pretrained=pretrained,
                                 data=str(Path(ds.path).expanduser().resolve()))
    digest = identity_hash(config.to_dict())
    if not str(config.out):
        config = dataclasses.replace(config, out=default_run_dir(config, digest, Path(request.data).stem))
        sources["out"] = "default"
    return RunPlan(config=config, dataset=ds.name, data_id=data_id(ds), classnames=tuple(ds.classnames_for(config.classes)),
                   identity_hash=digest, sources=sources, mode=mode)


def default_run_dir(config: TrainConfig, digest: str, data: str) -> str:
    """`runs/METHOD-DATA-Kshot-seedS-CLIP-WEIGHTS-HASH` for a resolved config: `data` the name the
    request gave the .beton (its stem), the weights (tag, file name, or `random`) and the short
    identity hash `digest`, so another setting never lands in this one's directory."""
    pretrained = config.pretrained
    weights = "random" if pretrained is None else Path(pretrained).stem if os.path.isfile(pretrained) else pretrained
    name = (f"{config.method}-{data}-{config.shots or 'all'}shot-seed{config.seed}-{config.clip}-"
            f"{weights}-{digest[:8]}")
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9._+-]", "_", name))


def check_request(plan: RunPlan) -> None:
    """What a planned run can still be refused for before torch loads: its folder (`rundir.check_out`)."""
    check_out(plan.config.out)


def plan_seeds(request: TrainConfig, seeds: Iterable[int], *, given: Optional[Iterable[str]] = None, mode: str = "auto"
               ) -> list[RunPlan]:
    """`fastprompt train --seeds`: one plan per seed, each its own run directory. With an `out`
    (a folder of the seeds' runs, not a run) each run is OUT/seedS (a sweep cell's last part);
    without one, each seed's default run directory under runs/ (`default_run_dir`)."""
    seeds = list(seeds)
    require(seeds, "--seeds names no seed; pass e.g. --seeds 1,2,3")
    require(len(set(seeds)) == len(seeds), f"--seeds {','.join(map(str, seeds))} lists a seed twice; give each once")
    parent = str(request.out)
    if parent:
        if holds_run(Path(parent)):
            raise FastpromptError(f"--out {parent} holds a run; with --seeds, --out is the folder of the seeds' runs "
                                  f"({parent}/seed1, ...): pass a new folder, or --seed S to continue that run")
    given = None if given is None else set(given) | {"seed"}
    requests = [dataclasses.replace(request, seed=seed, out=str(Path(parent) / f"seed{seed}") if parent else "")
                for seed in seeds]  # every seed checked before any is planned
    for r in requests:
        if r.out:
            check_out(r.out)
    return [plan_run(r, given=given, mode=mode) for r in requests]


# ------------------------------------------------------------------ packing (execution: fastprompt.training.engine)
PACK_HELP = ("off (each run alone), auto (as many runs as fit the device's memory, measured; 1 when packing gains "
             "nothing) or N (at most N runs)")
Packing = Union[int, str]  # a number of runs, or "auto"


def parse_pack(value: Union[str, int]) -> Packing:
    """--pack off | auto | N as the engine takes it: 1, "auto" or N >= 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "off":
            return 1
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
    raise FastpromptError(f"--pack {value!r} must be off, auto or a number of runs >= 1 ({PACK_HELP})")


def pack_key(plan: RunPlan) -> Optional[tuple]:
    """What the runs of one pack share (every setting but the seed, the output folder and each
    group's recipe, which stay per run); None for a plan that trains alone: a method that does
    not declare it packs (`MethodSpec.packs`), random weights (drawn from each run's seed: no CLIP
    to share), a feature cache, or a torchrun process."""
    from fastprompt.methods import method_spec

    c = plan.config
    if not method_spec(c.method).packs or c.pretrained is None or c.feature_cache \
            or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    options = json.dumps(c.options, sort_keys=True)
    return (c.data, c.method, c.clip, c.pretrained, c.template, c.classes, c.shots, c.batch_size, c.epochs, options,
            c.backend, c.device, c.precision, c.compile, c.compile_backend, c.nan_policy, c.trust_pickle, c.decoded_cache,
            c.num_workers)


def pack_groups(plans: Sequence[RunPlan], pack: Packing) -> list[list[RunPlan]]:
    """`plans` in groups that train together, in the order of their first plan: plans of one
    `pack_key`, at most `pack` a group (auto: the whole key; its size is measured when it runs);
    a plan that trains alone is a group of one."""
    groups: dict = {}
    for k, plan in enumerate(plans):
        key = pack_key(plan) if pack != 1 else None
        groups.setdefault(("alone", k) if key is None else key, []).append(plan)
    out = []
    for members in groups.values():
        size = len(members) if pack == "auto" else int(pack)
        out.extend(members[i:i + size] for i in range(0, len(members), size))
    return out
