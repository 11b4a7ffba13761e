"""The `Trainer`: few-shot prompt tuning with exact resume and DistributedDataParallel.

A Trainer executes one `RunPlan` (`fastprompt.training.plan`: every setting resolved before it
starts) and resolves nothing itself; `fastprompt.training.engine` executes lists of plans, each
alone (`train`) or packed (its runs' Trainers built, resumed, checkpointed and evaluated as
alone, their steps taken together by `fastprompt.training.pack`).

One run = one `--out` directory:
- `config.json`: the resolved `TrainConfig` (every group's lr and warm-up, every method
  option, epochs) plus run facts (class names, template, dataset, weights, the data's checksum,
  bf16 or fp32), written at the start: `load_run` / `fastprompt eval` rebuild the model from it alone;
- `metrics.jsonl`: one JSON line per epoch (loss, accuracy, every group's lr, images/s; `val_accuracy`
  on the epochs `--eval-every` scores the run's few-shot val subset);
- `checkpoint.json` + `checkpoint-*.safetensors` (`fastprompt.training.checkpoint`): prompts,
  the method's training state (`PromptModel.training_state`, e.g. PromptSRC's GPA sum), optimiser,
  RNG states, epoch and metrics, and the weights and data ids (`CHECKPOINT_FACTS`), committed
  atomically every `checkpoint_every` epochs; a run started again with the same `--out` resumes
  from it (on the same weights and data, whether config.json is there or not);
- `prompts.safetensors`: the trainable tensors of the reported model only, at the end;
- `results.json`: the reported model (`final_model`: the last epoch's, or best-val: the epoch with the
  best val accuracy, the first of equals, as Dassl's `TEST.FINAL_MODEL best_val`; `reported_epoch`),
  its test accuracies (base, new and harmonic mean for base-to-new), per-class accuracies, their mean and
  the confusion matrix, the run's identity, wall time, package versions and the git commit when there is one.
The directory holds one run of one setting, written by one process: `fastprompt.training.rundir`.

Optimisation: one optimiser with a param group per trained `ParamGroup` of the method
(`text`, `visual`, `cavpt`, `e2mim`), each on Dassl's schedule with its own peak lr and
warm-up (`fastprompt.training.config.dassl_lr`), set at the start of every epoch into the
group's lr tensor (fused SGD/AdamW read it on the device).

No host synchronisation inside a step: the loss, accuracy and non-finite check accumulate on
the device (`_running`) and are read once per epoch (see `training/compiled.py` for CUDA graphs).

Exact resume: epoch e's data order and augmentation are functions of (seed, e) (see
`fastprompt.data.loaders`), the learning rates are functions of e, and the RNG states are
saved at the epoch boundary; so a killed run resumed from its last checkpoint ends with
the prompts and metrics of a run that never stopped.

Under `torchrun --nproc-per-node N` every rank reads its shard of each global batch
(`batch_size / N` images), gradients are averaged by DDP (gloo on CPU, NCCL on CUDA), and
only rank 0 writes.

A method with a gradient rule (`PromptModel.gradient_rule()`, ProGrad) steps by it instead of
`loss.backward()`: the step's one forward returns named loss terms (`loss_terms`), the trainer
takes each term's gradient (`term_gradients`: one backward each, the graph kept in between),
averages them over ranks itself (such a step is not wrapped in DDP, whose hooks fire only
on `.backward()`) and writes the rule's combination into the tensors' `.grad`. Compiled, the
forward and each term's backward run AOTAutograd's graphs; `--compile reduce-overhead` (CUDA
graphs, one backward replay a step) is refused for such a method.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from fastprompt.data import open_dataset
from fastprompt.errors import FastpromptError, one_line
from fastprompt.files import atomic_write, write_json
from fastprompt.methods import create_model
from fastprompt.methods.base import PromptModel, term_gradients
from fastprompt.models.clip import load_clip
from fastprompt.runtime import autocast_for, effective_precision, resolve_device, rng_state, seed_everything, set_rng_state
from fastprompt.training import checkpoint, rundir
from fastprompt.training.compiled import compile_cache_is_warm, compile_fn
from fastprompt.training.progress import TrainProgress
from fastprompt.training.config import TrainConfig
from fastprompt.training.evaluate import confusion, evaluate_confusion, model_for_classes
from fastprompt.training.runfiles import class_results, harmonic_mean
from fastprompt.training.feature_cache import FeatureCache
from fastprompt.training.hooks import exit_after_step, kill_point
from fastprompt.training.identity import first_difference, identity
from fastprompt.training.plan import RunPlan, plan_run
from fastprompt.training.nonfinite import NonFiniteGuard
from fastprompt.training.shared_clip import SharedClip

log = logging.getLogger(__name__)

# what a checkpoint record must hold
RECORD_KEYS = ("config", "classnames", "epoch", "optimizer", "rng", "metrics")
# run facts that follow file contents, recorded in every checkpoint too (`facts`): a run whose
# config.json is lost is not continued on other weights or data (checkpoints before them lack them)
CHECKPOINT_FACTS = ("weights_id", "data_id")
# checkpoint tensors of the method's own training state (`PromptModel.training_state`, e.g. PromptSRC's GPA sum)
METHOD_STATE = "method."


class _Step(nn.Module):
    """The training objective as a module's forward, so DistributedDataParallel can wrap it:
    ({name: loss term}, detached logits), `PromptModel.loss_terms`."""

    def __init__(self, model: PromptModel):
        super().__init__()
        self.model = model

    def forward(self, images, labels, topk=None, features=None):
        extra = {"topk": topk} if topk is not None else {}
        if features is not None:
            extra["features"] = features
        return self.model.loss_terms(images, labels, **extra)


class Trainer:
    """Executes one `RunPlan`: owns its model, data, optimiser and run directory. Resolves
    nothing: every setting is the plan's (`fastprompt.training.plan`)."""

    def __init__(self, run, console=None, on_epoch: Optional[Callable[[dict], None]] = None, mode: Optional[str] = None,
                 clip: Optional[SharedClip] = None, data=None):
        """run: a `RunPlan` (a `TrainConfig` is planned first: `as_plan`); mode: the plan's, unless given;
        clip: a pack's one CLIP (`shared_clip.SharedClip`: built once, each run's RNGs as its own build leaves them);
        data: the plan's dataset already opened (a pack's runs read one; else opened here)."""
        self.plan = plan = as_plan(run, mode)
        self.shared_clip = clip
        self.mode = plan.mode
        self.started = time.time()
        self.config = config = plan.config
        log.info("plan of %s: %s", plan.out, "; ".join(plan.lines()))  # each resolved value and its source
        self.console = console
        self.on_epoch = on_epoch  # called on the main rank with each metrics.jsonl line (e.g. TensorBoard)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if config.device != "cpu" and torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if config.batch_size % self.world:
            raise FastpromptError(
                f"batch_size={config.batch_size} does not split over {self.world} processes; pick a multiple of {self.world}"
            )
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.precision = effective_precision(config.precision, self.device)  # bf16 | fp32 (config.json's autocast)
        self.autocast = autocast_for(self.precision, self.device)
        self.out = plan.out

        # everything that can fail on bad input happens before anything is written (the lock file and a folder
        # it made are removed again on failure)
        if data is not None and Path(data.path).resolve() != Path(config.data).resolve():
            raise ValueError(f"data={data.path} is not the plan's dataset {config.data}")
        self.data = open_dataset(config.data) if data is None else data  # the tables: the few-shot draw and the loaders read them
        self.data_id = plan.data_id
        self.classnames = list(plan.classnames)
        self.identity_hash = plan.identity_hash
        rundir.check_out(self.out)  # a folder of a run or of none, before the lock writes into it (again under it)
        self.lock = rundir.RunLock(self.out)  # taken first: a second process stops before loading anything
        if self.is_main:
            self.lock.acquire()
        try:
            self._build(config)
            self._prepare_out()
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: TrainConfig) -> None:
        """The model, optimiser and loaders (after the run directory's lock is held)."""
        self.template = config.template
        seed_everything(config.seed)  # random CLIP weights (--pretrained none) and prompt init follow the seed
        clip = config.clip
        if self.shared_clip is not None:  # the pack's CLIP, the RNGs advanced as building it here would
            clip = self.shared_clip.build(lambda: load_clip(config.clip, config.pretrained, device=self.device,
                                                            trust_pickle=config.trust_pickle))
        self.model = create_model(config.method, self.classnames, clip=clip, pretrained=config.pretrained,
                                  template=self.template, backend=config.backend, device=self.device,
                                  trust_pickle=config.trust_pickle, **config.options)
        self.data.check_image_size(self.model.bundle.image_size)  # val/test are stored at one size (prepare --eval-size)
        groups = self.model.param_groups()  # the planned groups (checked against the method's trained_groups)
        # config.json records the options as the model was built: those it derives (n_ctx from ctx_init) filled in
        self.config = config = dataclasses.replace(config, options=self.model.resolved_options())
        log.info("parameter groups: %s; %d epochs", ", ".join(
            f"{g.name} ({sum(p.numel() for _, p in members)} values) lr {config.group_lr[g.name]} warm-up "
            f"{config.group_warmup_epochs[g.name]}" for g, members in groups), config.epochs)
        self.optimizer = self._make_optimizer([(g.name, [p for _, p in members]) for g, members in groups])
        self.rule = self.model.gradient_rule()  # None: loss.backward(); else the method's gradients (see above)
        self.trained = [p for _, members in groups for _, p in members]  # the tensors a gradient rule writes
        mode = config.compile_mode(self.device.type)
        if self.rule is not None and mode == "reduce-overhead":
            raise FastpromptError(f"compile={config.compile!r}: {config.method} steps by a gradient rule (one backward per "
                                  "loss term), which CUDA graphs do not replay; use --compile default or --compile off")
        # fewshot.json: the files this run trains and validates on (Dassl's draw); a class without images fails here
        self.fewshot = self.data.fewshot_record(config.shots, config.seed, config.classes)
        if config.eval_every and not self.fewshot["val"]:
            raise FastpromptError(
                f"eval_every={config.eval_every}: {config.data} holds no val images of the run's classes to validate on; "
                "prepare it again with a val split (`fastprompt prepare`), or drop --eval-every and --final-model best-val"
            )
        n_train = len(self.fewshot["train"])
        self.cached_topk = self.model.wants_topk_table()
        # a batch larger than the subset is the subset (one batch a rank: its share, ceil(n / W)), so the loader's
        # buffers never hold more images than that
        local_batch = min(config.batch_size // self.world, -(-n_train // self.world))
        self.loader = self.data.loader(
            "train", shots=config.shots, seed=config.seed, classes=config.classes, train=True,
            image_size=self.model.bundle.image_size, batch_size=local_batch,
            device=self.device, num_workers=config.num_workers, order_seed=config.seed,
            return_indices=self.cached_topk,
            drop_last=n_train >= config.batch_size,  # Dassl's rule on the global batch; else one smaller batch
            decoded_cache=config.decoded_cache,  # decode the subset once, before the first epoch (data/decoded.py)
        )
        self.step_module: nn.Module = _Step(self.model)
        if self.distributed and self.rule is None:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.model.may_skip_parameters(),  # e.g. E2MIM's critic when mi_weight=0
            )
        # the (optionally compiled) training step: forward and, through AOTAutograd, backward;
        # static shapes: the loader drops the ragged last batch (or has one batch when the subset is smaller)
        self.step_fn = compile_fn(self.step_module, mode, device=self.device, backend=config.compile_backend)
        self.cuda_graphs = mode == "reduce-overhead" and self.device.type == "cuda"  # see training/compiled.py
        self.epoch = 0  # epochs completed
        self.metrics: list[dict] = []
        # --final-model best-val: {"epoch", "val_accuracy", "prompts"} of the best-on-val epoch so far (Dassl's
        # model-best.pth.tar), in every checkpoint; None before the first validation
        self.best: Optional[dict] = None
        self._val_loader = None  # the few-shot val subset's loader, made at the first validation
        self._topk_table: Optional[torch.Tensor] = None
        self.feature_cache: Optional[FeatureCache] = None
        self.train_subset = self.loader.indices  # the draw the loader holds (sorted .beton indices), not drawn again
        self.guard = NonFiniteGuard(config.nan_policy, self.device, self.distributed)

    def _make_optimizer(self, groups: list[tuple[str, list[nn.Parameter]]]) -> torch.optim.Optimizer:
        """One optimiser, a param group per trained part, `fused=True` (one kernel per group and
        step, on CUDA and CPU). Each group's lr is a 0-d float32 tensor on the device (the fused
        kernels read it there) that `_set_lr` fills in place every epoch: the step reads no lr
        from the host, and a new lr is new data in the same tensor, not a new compile or graph."""
        cfg = self.config
        param_groups = [{"params": params, "name": name,
                         "lr": torch.tensor(cfg.lr_at(name, 0), dtype=torch.float32, device=self.device)}
                        for name, params in groups]
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(param_groups, lr=cfg.warmup_lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, fused=True)
        return torch.optim.AdamW(param_groups, lr=cfg.warmup_lr, weight_decay=cfg.weight_decay, fused=True)

    def _set_lr(self, epoch: int) -> dict[str, float]:
        """Every group's lr of 0-based `epoch` (Dassl's schedule), written into its lr tensor."""
        lr = {}
        for group in self.optimizer.param_groups:
            lr[group["name"]] = self.config.lr_at(group["name"], epoch)
            group["lr"].fill_(lr[group["name"]])
        return lr

    # --------------------------------------------------------------- run dir
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _run_facts(self) -> dict:
        return {"classnames": self.classnames, "template": self.template, "dataset": self.data.name,
                "weights_id": self.model.bundle.weights_id, "image_size": self.model.bundle.image_size,
                "data_id": self.data_id,  # the .beton's checksum (None: a sidecar without one)
                "autocast": self.precision,  # --precision auto: bf16 on cuda, fp32 on cpu
                "world_size": self.world, "identity_hash": self.identity_hash}

    def _prepare_out(self) -> None:
        """Take the run directory (lock), check it holds this run or none, and resume or start.
        Everything is checked before the first file is written or removed."""
        if self.is_main:
            rundir.check_out(self.out)  # under the lock: a run's folder or a new one, whatever the mode
            rundir.clean_temporaries(self.out)
            if self.mode == "restart":
                rundir.clear(self.out)
            has_checkpoint = any((self.out / name).is_file() for name in (checkpoint.RECORD, checkpoint.LEGACY))
            try:
                saved = rundir.read_config(self.out)
            except FastpromptError:
                if not has_checkpoint:
                    raise
                saved = None  # the checkpoint's own config is checked in _resume; config.json is rewritten from it
                log.warning("%s is unreadable; it is rewritten if the checkpoint holds this run", self.out / rundir.CONFIG)
            if saved is not None:
                rundir.check_same_run(self.out, {**self.config.to_dict(), **self._run_facts()}, saved, both=True)
            if self.mode == "resume" and not has_checkpoint:
                raise FastpromptError(f"--resume: {self.out} holds no checkpoint to resume; drop --resume to start the run")
        if self.distributed:
            dist.barrier()  # rank 0 has checked (and, with --restart, cleared) the directory
        saved_checkpoint = checkpoint.load(self.out)
        if saved_checkpoint is not None:
            self._resume(*saved_checkpoint)
            return
        if self.is_main:
            rundir.clear(self.out)  # a run stopped before its first checkpoint, or files of another: start whole
            with self._disk(self.out / rundir.CONFIG):
                write_json(self.out / rundir.CONFIG, {**self.config.to_dict(), **self._run_facts()})
                write_json(self.out / "fewshot.json", self.fewshot)
                (self.out / "metrics.jsonl").write_text("")

    def _resume(self, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint record after checking it holds this run, whole and consistent."""
        path = self.out / checkpoint.RECORD
        fix = "pass --restart to train the run again from the start, or use another --out"
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise FastpromptError(f"{path} lacks {', '.join(missing)}; {fix}")
        if not isinstance(record["config"], dict):
            raise FastpromptError(f"{path} holds no config; {fix}")
        diff = first_difference(self.config.to_dict(), record["config"])
        if diff is not None:
            raise FastpromptError(f"{path} is a checkpoint of a run with {diff[0]}={diff[2]!r}, this command has "
                                  f"{diff[0]}={diff[1]!r}; {fix}")
        if record["classnames"] != list(self.classnames):
            raise FastpromptError(f"{path} is a checkpoint of a run on other classes than {self.config.data} "
                                  f"({self.config.classes}); {fix}")
        facts, mine = record.get("facts", {}), self._run_facts()
        if not isinstance(facts, dict):
            raise FastpromptError(f"{path} holds facts that are not a JSON object; {fix}")
        for key in CHECKPOINT_FACTS:
            if key in facts and facts[key] != mine[key]:  # checked without config.json: it may be lost
                raise FastpromptError(f"{path} is a checkpoint of a run with {key}={facts[key]!r}, this command has "
                                      f"{key}={mine[key]!r}; {rundir.changed_fact(key, self.config.data)}{fix}")
        epoch, metrics = record["epoch"], record["metrics"]
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= self.config.epochs:
            raise FastpromptError(f"{path} says epoch {epoch!r}, which this run of {self.config.epochs} epochs cannot have "
                                  f"reached; {fix}")
        if not isinstance(metrics, list) or [m.get("epoch") if isinstance(m, dict) else None for m in metrics] != \
                list(range(1, epoch + 1)):
            raise FastpromptError(f"{path} holds metrics that are not those of epochs 1..{epoch}; {fix}")
        prompts = {k.removeprefix("prompts."): v for k, v in tensors.items() if k.startswith("prompts.")}
        expected = set(self.model.prompt_state_dict())
        if set(prompts) != expected:
            lacking = sorted(expected - set(prompts)) or sorted(set(prompts) - expected)
            raise FastpromptError(f"{path}: its tensors do not match this run's prompts ({', '.join(lacking)}); {fix}")
        # the state (momentum, Adam moments) from the checkpoint; the group settings (lr tensors,
        # fused) stay this optimiser's: every one of them follows from the config, compared above
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.model.load_prompt_state_dict(prompts)
            self.model.load_training_state({k.removeprefix(METHOD_STATE): v for k, v in tensors.items()
                                            if k.startswith(METHOD_STATE)})
            self.optimizer.load_state_dict(checkpoint.optimizer_from_parts(record["optimizer"], tensors))
            rng = checkpoint.rng_from_json(record["rng"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
            reason = one_line(err)
            raise FastpromptError(f"{path} does not fit this run ({reason}); {fix}") from None
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
            for p in group["params"]:  # fused AdamW keeps its step count on the parameter's device
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        self.best = self._resumed_best(record, tensors, epoch, path, fix)
        set_rng_state(rng)
        self.epoch = epoch
        self.metrics = list(metrics)
        if self.is_main:
            with self._disk(self.out / "metrics.jsonl"):
                # config.json rewritten whole (the same identity; this command's execution settings)
                write_json(self.out / rundir.CONFIG, {**self.config.to_dict(), **self._run_facts()})
                with open(self.out / "metrics.jsonl", "w") as f:  # drop lines of epochs after the checkpoint
                    for line in self.metrics:
                        f.write(json.dumps(line) + "\n")
        self._say(f"resuming {self.out} after epoch {self.epoch}/{self.config.epochs}")

    def _resumed_best(self, record: dict, tensors: dict[str, torch.Tensor], epoch: int, path: Path, fix: str
                      ) -> Optional[dict]:
        """--final-model best-val: the best-on-val epoch a checkpoint after `epoch` holds (record
        `best_val`, tensors `best.NAME`), checked; None for a last-model run or before any validation."""
        if self.config.final_model != "best-val":
            return None
        validated = [e for e in range(1, epoch + 1) if self.config.validates_after(e)]
        best = record.get("best_val")
        if best is None and not validated:
            return None
        prompts = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        if not isinstance(best, dict) or best.get("epoch") not in validated or \
                not isinstance(best.get("val_accuracy"), (int, float)) or set(prompts) != set(self.model.prompt_state_dict()):
            raise FastpromptError(f"{path} lacks the best-on-val prompts of a --final-model best-val run validated after "
                                  f"epochs {', '.join(map(str, validated))}; {fix}")
        return {"epoch": best["epoch"], "val_accuracy": float(best["val_accuracy"]), "prompts": prompts}

    def _last_checkpoint(self) -> str:
        """What a failed run leaves to resume from, for its error message."""
        try:
            record = checkpoint.read_record(self.out)
        except FastpromptError:
            record = None
        if record is None:
            return "no checkpoint was written yet, so the next start trains from epoch 1"
        return f"the checkpoint after epoch {record.get('epoch')} in {self.out} is kept and the next start resumes from it"

    @contextmanager
    def _disk(self, path: Path):
        """A write to the run directory: an OSError (disk full, read-only) becomes one line naming the path."""
        try:
            yield
        except OSError as err:
            raise FastpromptError(f"cannot write {path} ({err.strerror or err}); {self._last_checkpoint()}; free disk "
                                  "space or make the folder writable, then run the command again") from None

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON record, tensors) of everything an exact resume needs."""
        tensors = {f"prompts.{k}": v for k, v in self.model.prompt_state_dict().items()}
        tensors.update({METHOD_STATE + k: v for k, v in self.model.training_state().items()})
        record = {
            "config": self.config.to_dict(),
            "classnames": list(self.classnames),
            "epoch": self.epoch,
            "optimizer": checkpoint.optimizer_to_parts(self._optimizer_state(), tensors),
            "rng": checkpoint.rng_to_json(rng_state()),
            "metrics": self.metrics,
            "facts": {key: value for key, value in self._run_facts().items() if key in CHECKPOINT_FACTS},
        }
        if self.best is not None:  # --final-model best-val
            record["best_val"] = {"epoch": self.best["epoch"], "val_accuracy": self.best["val_accuracy"]}
            tensors.update({f"best.{k}": v for k, v in self.best["prompts"].items()})
        return record, tensors

    def _optimizer_state(self) -> dict:
        """The optimiser's `state_dict()` with every lr as a number (JSON; read once per checkpoint)."""
        state = self.optimizer.state_dict()
        state["param_groups"] = [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]
        return state

    def save_checkpoint(self) -> None:
        if self.is_main:
            with self._disk(self.out / checkpoint.RECORD):
                checkpoint.save(self.out, *self.state_dict())

    def _say(self, text: str) -> None:
        if self.is_main and self.console is not None:
            self.console.print(text, soft_wrap=True)  # a log line is never wrapped

    # --------------------------------------------------------------- training
    def _build_topk_table(self) -> None:
        """CAVPT `topk_source="cached"`: zero-shot top-K of every training image at centre crop,
        computed once per run (one frozen forward per image) instead of once per step."""
        cfg = self.config
        loader = self.data.loader("train", shots=cfg.shots, seed=cfg.seed, classes=cfg.classes, train=False,
                                  image_size=self.model.bundle.image_size, batch_size=cfg.eval_batch_size,
                                  device=self.device, num_workers=cfg.num_workers, return_indices=True,
                                  drop_last=False)
        table = torch.full((self.data.num_samples, self.model.k_n), -1, dtype=torch.long)  # (N, K_N)
        self.model.eval()
        with self.autocast():
            for images, _, idx in loader:
                table[idx] = self.model.zero_shot_topk(images).cpu()
        table = table.to(self.device)  # (N, K_N): on the device, so a step's lookup is a device gather
        if self.distributed:  # each rank scored its shard; every entry is >= 0 on exactly the ranks that scored it
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
        self._topk_table = table

    def _topk_for(self, indices: torch.Tensor) -> torch.Tensor:
        """The cached top-K [B, K_N] of a batch's training images (by .beton index)."""
        return self._topk_table[indices.to(self.device, non_blocking=True)]  # (B, K_N)

    def _batches(self):
        """This epoch's batches: the FFCV loader, or the feature cache's view of the epoch."""
        if self.feature_cache is None:
            return self.loader
        cfg = self.config
        return self.feature_cache.batches(self.data, self.train_subset, cfg.classes, seed=cfg.seed, epoch=self.epoch,
                                          batch_size=cfg.batch_size, rank=self.rank, world=self.world)

    def start_epoch(self) -> dict[str, float]:
        """Epoch `self.epoch` begins: every group's lr set (returned), the model training, the
        loader on this epoch's order and augmentation."""
        lr = self._set_lr(self.epoch)
        self.model.train()
        self.model.set_epoch(self.epoch)
        self.loader.set_epoch(self.epoch)
        return lr

    def train_epoch(self, progress: Optional[TrainProgress] = None) -> dict:
        cfg = self.config
        lr = self.start_epoch()
        running = self._running = self._new_running()
        self.guard.start_epoch()
        start = time.perf_counter()
        for step, batch in enumerate(self._batches()):
            images, labels = batch[0], batch[1]  # (b, 3, S, S) or cached features (b, D), (b,)
            topk = self._topk_for(batch[2]) if self.cached_topk else None
            # zero the last step's gradients before the graphs run again (CUDA graphs reuse their memory)
            self.optimizer.zero_grad(set_to_none=True)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's outputs may be overwritten
            with self.autocast():
                if self.feature_cache is not None:
                    terms, logits = self.step_fn(None, labels, features=images)
                else:
                    terms, logits = self.step_fn(images, labels, topk)
            loss = terms["loss"]
            checked = loss if len(terms) == 1 else torch.stack([t.detach() for t in terms.values()]).sum()  # NaN in any
            if not self.guard.step_ok(checked, step):  # --nan-policy (training/nonfinite.py): stop reads nothing here
                continue
            loss_value = loss.detach()  # 0-d, on the device: nothing here reads a value back to the host
            if self.rule is None:
                loss.backward()
            else:
                self._rule_backward(terms)
            self.optimizer.step()
            exit_after_step(self.epoch * len(self.loader) + step + 1)  # test hook: see training/hooks.py
            running["loss"] += loss_value.double() * labels.shape[0]
            running["correct"] += (logits.argmax(-1) == labels).sum()
            running["seen"] += labels.shape[0]
            if progress is not None:
                progress.step(lambda: float(running["loss"] / running["seen"].clamp(min=1)))  # read every few steps
        # the epoch's CPU-GPU syncs: the non-finite check (--nan-policy stop) and the running sums (summed over ranks)
        bad_step = self.guard.end_epoch()
        if bad_step is not None:
            raise FastpromptError(
                f"the loss became non-finite (NaN or inf) at epoch {self.epoch + 1} step {bad_step}; "
                f"{self._last_checkpoint()}; lower --lr, use --precision fp32, or pass --nan-policy skip"
            )
        if self.guard.skipped_all:  # --nan-policy skip: nothing of this epoch trained, nor will the next
            steps = self.guard.steps
            raise FastpromptError(
                f"every step of epoch {self.epoch + 1} had a non-finite loss (NaN or inf) and was skipped ({steps} of "
                f"{steps}, --nan-policy skip): the run no longer trains; {self._last_checkpoint()}; lower --lr or use "
                "--precision fp32"
            )
        stats = torch.stack([running["loss"], running["correct"].double(), running["seen"].double()])  # (3,)
        if self.distributed:
            dist.all_reduce(stats)
        seconds = time.perf_counter() - start
        total_loss, correct, seen = stats.tolist()
        line = {"epoch": self.epoch + 1, "loss": total_loss / max(seen, 1), "train_accuracy": 100.0 * correct / max(seen, 1),
                "lr": lr, "images": int(seen), "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1)}
        if cfg.nan_policy == "skip":
            line["skipped_steps"] = self.guard.skipped
        return line

    def _rule_backward(self, terms: dict[str, torch.Tensor]) -> None:
        """The gradient rule's step: each term's gradient, averaged over ranks, combined by the rule."""
        grads = term_gradients(terms, self.rule.terms, self.trained)
        if self.distributed:  # what DDP does for loss.backward(): the mean over ranks, one flat buffer
            for name, tensors in grads.items():
                flat = torch.cat([g.reshape(-1) for g in tensors])
                dist.all_reduce(flat)
                flat /= self.world
                grads[name] = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in tensors]), tensors)]
        for p, g in zip(self.trained, self.rule.combine(grads)):
            p.grad = g.to(p.dtype)

    def _new_running(self) -> dict[str, torch.Tensor]:
        """The epoch's running sums, kept on the device (0-d each) and read once at its end:
        loss (sum of loss · batch), correct and seen (images). The non-finite check is
        `self.guard`'s (training/nonfinite.py)."""
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=self.device)  # noqa: E731
        return {"loss": zeros(torch.float64), "correct": zeros(torch.long), "seen": zeros(torch.long)}

    def validate(self) -> float:
        """Top-1 accuracy (%) of the prompts now on the run's few-shot val subset (Dassl's draw:
        min(shots, 4) per class), at centre crop; on every rank (each scores its shard)."""
        cfg = self.config
        if self._val_loader is None:
            self._val_loader = self.data.loader("val", shots=cfg.shots, seed=cfg.seed, classes=cfg.classes, train=False,
                                                image_size=self.model.bundle.image_size, batch_size=cfg.eval_batch_size,
                                                device=self.device, num_workers=cfg.num_workers, drop_last=False)
        counts = confusion(self.model, self._val_loader, len(self.classnames), autocast=self.autocast)  # (K, K)
        return class_results(counts.tolist(), list(self.classnames))["accuracy"]

    def _after_epoch_validation(self, line: dict) -> None:
        """--eval-every: the epoch's val accuracy into its metrics line; under --final-model best-val
        the prompts kept when it beats every earlier one (strictly, so the first of equals stays:
        Dassl's `curr_result > self.best_result`, dassl/engine/trainer.py after_epoch)."""
        if not self.config.validates_after(self.epoch):
            return
        accuracy = line["val_accuracy"] = self.validate()
        if self.config.final_model == "best-val" and (self.best is None or accuracy > self.best["val_accuracy"]):
            prompts = {k: v.detach().cpu().clone() for k, v in self.model.prompt_state_dict().items()}
            self.best = {"epoch": self.epoch, "val_accuracy": accuracy, "prompts": prompts}

    def train(self) -> dict:
        """Train the remaining epochs, then evaluate on the test split; returns results.json's content."""
        cfg = self.config
        self._say(f"[bold]fastprompt train[/bold] {json.dumps(self.config.to_dict())}")
        progress = TrainProgress(self.console, cfg.epochs, len(self.loader), done=self.epoch, enabled=self.is_main)
        self.prepare_training(progress.say)
        with progress:
            while self.epoch < cfg.epochs:
                progress.start_epoch(self.epoch)
                self.end_epoch(self.train_epoch(progress), progress)
        return self.finish()

    def prepare_training(self, say: Optional[Callable[[str], None]] = None) -> None:
        """What the first epoch needs, made once before it: CAVPT's cached top-K table, the feature
        cache, the decoded training images; `say` the compile notice."""
        cfg = self.config
        if self.cached_topk and self.epoch < cfg.epochs:
            self._build_topk_table()
        if cfg.feature_cache and self.epoch < cfg.epochs:
            views = min(cfg.feature_cache, cfg.epochs)  # epoch e reads view e mod V: views past the last epoch go unread
            if views < cfg.feature_cache and self.is_main:
                log.warning("feature_cache=%d is more views than the %d epochs of this run read (epoch e reads view e): "
                            "capped at %d", cfg.feature_cache, cfg.epochs, views)
            self.feature_cache = FeatureCache.build(self.model, self.data, views=views, aug_seed=0,
                                                    device=self.device, batch_size=cfg.eval_batch_size,
                                                    num_workers=cfg.num_workers, autocast=self.autocast)
            if cfg.feature_cache < cfg.epochs:
                self._say(f"feature cache: {cfg.feature_cache} augmented views for {cfg.epochs} epochs; epoch e reuses "
                          f"view e mod {cfg.feature_cache} (a deliberate approximation of fresh augmentation)")
        if self.feature_cache is None and self.epoch < cfg.epochs:
            seconds = self.loader.decode()  # before the first epoch, so its images/s is the loader's steady state
            self._say(f"train loader: {self.loader.cache_plan.line()}" + (f"; decoded in {seconds:.1f} s" if seconds else ""))
        mode = cfg.compile_mode(self.device.type)
        if mode is not None and self.epoch < cfg.epochs and say is not None:
            say("compiling the training step (first time on this machine: 1-2 minutes)" if not compile_cache_is_warm()
                else "compiling the training step (from the compile cache: seconds)")

    def end_epoch(self, line: dict, progress: Optional[TrainProgress] = None) -> None:
        """The epoch `line` (its metrics.jsonl line) trained: validation, the metrics line, the checkpoint."""
        cfg = self.config
        self.epoch += 1
        self.model.end_epoch(self.epoch, cfg.epochs)  # the method's between-epoch step (PromptSRC's GPA)
        self._after_epoch_validation(line)
        self.metrics.append(line)
        if progress is not None:
            progress.end_epoch(line)
        if self.is_main:
            text = json.dumps(line) + "\n"
            with self._disk(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
                f.write(text[: len(text) // 2])
                f.flush()
                kill_point("metrics-append")  # test hook: half a line written
                f.write(text[len(text) // 2:])
            if self.on_epoch is not None:
                self.on_epoch(line)
        if (cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0) or self.epoch == cfg.epochs:
            self.save_checkpoint()

    def finish(self, counts_of: Optional[Callable[[PromptModel, str], torch.Tensor]] = None) -> dict:
        """The trained run's reported model evaluated on the test split (`final_evaluation`), its
        prompts and results.json written; returns results.json's content."""
        kill_point("before-results")  # test hook: trained and checkpointed, no results yet
        self._deploy_final_model()
        results = self.final_evaluation(counts_of)
        if self.is_main:
            results.update(self.provenance())
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.prompt_state_dict().items()}
            with self._disk(self.out / "prompts.safetensors"):
                atomic_write(self.out / "prompts.safetensors", lambda tmp: save_file(state, tmp))
            with self._disk(self.out / rundir.RESULTS):
                write_json(self.out / rundir.RESULTS, results)
        return results

    def provenance(self) -> dict:
        """What results.json records beside the accuracies: the resolved identity, the time, the code."""
        resolved = {**self.config.to_dict(), **self._run_facts()}
        ident = {k: v for k, v in identity(resolved).items() if k != "classnames"}  # class names: config.json
        return {"identity": ident, "identity_hash": self.identity_hash,
                "wall_seconds": round(time.time() - self.started, 3),  # this command's
                "train_seconds": round(sum(m.get("seconds", 0.0) for m in self.metrics), 3),  # every epoch's, over restarts
                **rundir.provenance()}

    def _deploy_final_model(self) -> None:
        """The model results.json reports into `self.model`: the last epoch's prompts (already
        there), or the best-on-val epoch's (Dassl's after_train: "Deploy the model with the best val
        performance"); `self.reported` says which epoch and its val accuracy."""
        cfg = self.config
        if cfg.final_model == "best-val":
            if self.best is None:  # the last epoch is always validated (`validates_after`): a checkpoint without it
                raise FastpromptError(f"{self.out} holds no best-on-val prompts; pass --restart to train the run again")
            self.model.load_prompt_state_dict({k: v.to(self.device) for k, v in self.best["prompts"].items()})
            self.reported = {"epoch": self.best["epoch"], "val_accuracy": self.best["val_accuracy"]}
        else:
            last = self.metrics[-1] if self.metrics else {}
            self.reported = {"epoch": cfg.epochs, "val_accuracy": last.get("val_accuracy")}

    def final_evaluation(self, counts_of: Optional[Callable[[PromptModel, str], torch.Tensor]] = None) -> dict:
        """results.json's evaluation of the deployed model on the test split: accuracy, per-class
        accuracies, their mean and the confusion matrix (base and new apart for base-to-new).
        `counts_of(model, classes)`: the confusion matrix of `model` on the test images of `classes`
        (default `evaluate_confusion`; a pack shares its frozen tower's test features: the engine's)."""
        cfg = self.config

        def scores(model, classes: str) -> dict:
            if counts_of is not None:
                counts = counts_of(model, classes)
            else:
                counts = evaluate_confusion(model, self.data, "test", classes, device=self.device,
                                            batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                                            autocast=self.autocast)
            return class_results(counts.tolist(), list(model.classnames))

        results = {"method": cfg.method, "dataset": self.data.name, "shots": cfg.shots, "seed": cfg.seed,
                   "epochs": cfg.epochs, "classes": cfg.classes, "final_model": cfg.final_model,
                   "reported_epoch": self.reported["epoch"]}
        if self.reported["val_accuracy"] is not None:
            results["val_accuracy"] = self.reported["val_accuracy"]
        model_line = "" if cfg.final_model == "last" else f" (best-val model of epoch {self.reported['epoch']})"
        if cfg.classes == "base":
            base = scores(self.model, "base")
            new = scores(model_for_classes(self.model, self.data.classnames_for("new")), "new")
            results.update(base_accuracy=base["accuracy"], new_accuracy=new["accuracy"],
                           harmonic_mean=harmonic_mean(base["accuracy"], new["accuracy"]))
            for half, numbers in (("base", base), ("new", new)):
                results.update({f"{half}_{key}": numbers[key] for key in ("mean_per_class_accuracy", "per_class", "confusion")})
            self._say(f"base {base['accuracy']:.2f}%  new {new['accuracy']:.2f}%  harmonic mean "
                      f"{results['harmonic_mean']:.2f}%{model_line}")
        else:
            numbers = scores(self.model, "all")
            results["test_accuracy"] = numbers.pop("accuracy")
            results.update(numbers)
            self._say(f"test accuracy {results['test_accuracy']:.2f}% (mean per class "
                      f"{results['mean_per_class_accuracy']:.2f}%){model_line}")
        return results

    def close(self) -> None:
        self.lock.release()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def finished_run(plan: RunPlan) -> Optional[dict]:
    """results.json of the plan's run directory when it holds this run finished (identity
    checked, without building the model); None when it holds no finished run. FastpromptError
    when it holds another."""
    results = rundir.finished_results(plan.out)
    if results is None:
        return None
    try:
        saved = rundir.read_config(plan.out)
    except FastpromptError:
        return None  # the trainer decides (a checkpoint may hold the run)
    if saved is None:
        return None
    rundir.check_same_run(plan.out, plan.expected(), saved)
    return results


def as_plan(run, mode: Optional[str] = None) -> RunPlan:
    """`run` as a plan: a `RunPlan` as it is (its mode replaced by `mode` when given), a
    `TrainConfig` planned (`plan_run`: a library caller's request)."""
    if isinstance(run, RunPlan):
        return run if mode is None else run.with_(mode=mode)
    if isinstance(run, TrainConfig):
        return plan_run(run, mode=mode or "auto")
    raise TypeError(f"train takes a RunPlan or a TrainConfig, got {type(run).__name__}")


def train(run, console=None, on_epoch: Optional[Callable[[dict], None]] = None, *,
          mode: Optional[str] = None, force_eval: bool = False) -> dict:
    """Train one planned run (`run`: a `RunPlan`, or a `TrainConfig` to plan) to the end and
    evaluate it; returns results.json's content.

    mode (default: the plan's): "auto" continues the run the directory holds if it is this
    setting (a finished one is not evaluated again: its results are returned, unless
    `force_eval`), "resume" insists on a checkpoint to continue, "restart" removes the
    directory's run first. A directory holding another setting is refused in every mode but
    "restart"; one that holds other files and no run, in every mode (`rundir.check_out`)."""
    plan = as_plan(run, mode)
    rundir.check_out(plan.out)
    if plan.mode != "restart":
        results = finished_run(plan)
        if results is not None and not force_eval:
            if console is not None and int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 speaks
                console.print(f"done, results in {plan.out / rundir.RESULTS} (--force-eval evaluates again, "
                              "--restart trains again)", soft_wrap=True)  # a path is never broken
            return results
    trainer = Trainer(plan, console=console, on_epoch=on_epoch)
    try:
        return trainer.train()
    finally:
        trainer.close()
