"""The `Trainer`: few-shot prompt tuning with exact resume and DistributedDataParallel.

One run = one `--out` directory:
- `config.json`: the resolved `TrainConfig` (every group's lr and warm-up, every method
  option, epochs) plus run facts (class names, template, dataset, weights), written at the
  start: `load_run` / `fastprompt eval` rebuild the model from it alone;
- `metrics.jsonl`: one JSON line per epoch (loss, accuracy, every group's lr, images/s);
- `checkpoint.json` + `checkpoint-*.safetensors` (`fastprompt.training.checkpoint`): prompts,
  optimiser, RNG states, epoch and metrics, committed atomically every `checkpoint_every`
  epochs; a run started again with the same `--out` resumes from it;
- `prompts.safetensors`: the trainable tensors only, at the end;
- `results.json`: test accuracies at the end (base, new and harmonic mean for base-to-new).

Optimisation: one optimiser with a param group per trained `ParamGroup` of the method
(`text`, `visual`, `cavpt`, `e2mim`), each on Dassl's schedule with its own peak lr and
warm-up (`fastprompt.training.config.dassl_lr`), set at the start of every epoch.

Exact resume: epoch e's data order and augmentation are functions of (seed, e) (see
`fastprompt.data.loaders`), the learning rates are functions of e, and the RNG states are
saved at the epoch boundary; so a killed run resumed from its last checkpoint ends with
the prompts and metrics of a run that never stopped.

Under `torchrun --nproc-per-node N` every rank reads its shard of each global batch
(`batch_size / N` images), gradients are averaged by DDP (gloo on CPU, NCCL on CUDA), and
only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from fastprompt.data import open_dataset
from fastprompt.errors import FastpromptError
from fastprompt.files import atomic_write, write_json
from fastprompt.methods import create_model
from fastprompt.methods.base import PromptModel
from fastprompt.runtime import autocast_for, resolve_device, rng_state, seed_everything, set_rng_state
from fastprompt.training import checkpoint
from fastprompt.training.checkpoint import to_json_value
from fastprompt.training.compiled import compile_cache_is_warm, compile_fn
from fastprompt.training.progress import TrainProgress
from fastprompt.training.config import TrainConfig
from fastprompt.training.evaluate import evaluate, harmonic_mean, model_for_classes
from fastprompt.training.feature_cache import FeatureCache
from fastprompt.training.hooks import exit_after_step

log = logging.getLogger(__name__)

# what must match for a run directory's checkpoint to be resumed by this command
RESUME_KEYS = ("method", "classes", "shots", "seed", "clip", "epochs", "batch_size", "optimizer", "feature_cache",
               "group_lr", "group_warmup_epochs", "warmup_lr", "momentum", "weight_decay", "options")


class _Step(nn.Module):
    """The training objective as a module's forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: PromptModel):
        super().__init__()
        self.model = model

    def forward(self, images, labels, topk=None, features=None):
        extra = {"topk": topk} if topk is not None else {}
        if features is not None:
            extra["features"] = features
        return self.model.loss_and_logits(images, labels, **extra)


class Trainer:
    """Owns the model, data, optimiser and run directory of one `fastprompt train`."""

    def __init__(self, config: TrainConfig, console=None, on_epoch: Optional[Callable[[dict], None]] = None):
        self.config = config
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
        self.autocast = autocast_for(config.precision, self.device)
        self.out = Path(config.out)

        # everything that can fail on bad input happens before anything is written
        self.data = open_dataset(config.data)
        self.classnames = self.data.classnames_for(config.classes)
        self.template = config.template or self.data.template
        seed_everything(config.seed)  # random CLIP weights (--pretrained none) and prompt init follow the seed
        self.model = create_model(config.method, self.classnames, clip=config.clip, pretrained=config.pretrained,
                                  template=self.template, backend=config.backend, device=self.device,
                                  **config.options)
        groups = self.model.param_groups()
        self.config = config = config.resolve(self.data.name, [g for g, _ in groups], self.model.resolved_options())
        log.info("parameter groups: %s; %d epochs", ", ".join(
            f"{g.name} ({sum(p.numel() for _, p in members)} values) lr {config.group_lr[g.name]} warm-up "
            f"{config.group_warmup_epochs[g.name]}" for g, members in groups), config.epochs)
        param_groups = [{"params": [p for _, p in members], "name": g.name, "lr": config.lr_at(g.name, 0)}
                        for g, members in groups]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(param_groups, lr=config.warmup_lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(param_groups, lr=config.warmup_lr, weight_decay=config.weight_decay)
        # fewshot.json: the files this run trains and validates on (Dassl's draw); a class without images fails here
        self.fewshot = self.data.fewshot_record(config.shots, config.seed, config.classes)
        n_train = len(self.fewshot["train"])
        self.cached_topk = self.model.wants_topk_table()
        self.loader = self.data.loader(
            "train", shots=config.shots, seed=config.seed, classes=config.classes, train=True,
            image_size=self.model.bundle.image_size, batch_size=config.batch_size // self.world,
            device=self.device, num_workers=config.num_workers, order_seed=config.seed,
            return_indices=self.cached_topk,
            drop_last=n_train >= config.batch_size,  # Dassl's rule on the global batch; else one smaller batch
        )
        self.step_module: nn.Module = _Step(self.model)
        if self.distributed:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # e.g. E2MIM's critic when mi_weight=0
            )
        # the (optionally compiled) training step: forward and, through AOTAutograd, backward;
        # static shapes: the loader drops the ragged last batch (or has one batch when the subset is smaller)
        self.step_fn = compile_fn(self.step_module, config.compile_mode(self.device.type), device=self.device,
                                  backend=config.compile_backend)
        self.epoch = 0  # epochs completed
        self.metrics: list[dict] = []
        self._topk_table: Optional[torch.Tensor] = None
        self.feature_cache: Optional[FeatureCache] = None
        self.train_subset = self.data.indices("train", shots=config.shots, seed=config.seed, classes=config.classes)
        self._prepare_out()

    # --------------------------------------------------------------- run dir
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _run_facts(self) -> dict:
        return {"classnames": self.classnames, "template": self.template, "dataset": self.data.name,
                "weights_id": self.model.bundle.weights_id, "image_size": self.model.bundle.image_size,
                "world_size": self.world}

    def _prepare_out(self) -> None:
        saved = checkpoint.load(self.out) if self.out.is_dir() else None
        if saved is not None:
            self._resume(*saved)
            return
        if self.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / ".write-probe"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise FastpromptError(f"cannot write to --out {self.out} ({err.strerror}); pick a writable directory") from None
            write_json(self.out / "config.json", {**self.config.to_dict(), **self._run_facts()})
            write_json(self.out / "fewshot.json", self.fewshot)
            (self.out / "metrics.jsonl").write_text("")

    def _resume(self, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        saved, ours = record.get("config", {}), to_json_value(self.config.to_dict())
        for key in RESUME_KEYS:
            if saved.get(key) != ours[key]:
                raise FastpromptError(
                    f"--out {self.out} holds a run with {key}={saved.get(key)!r}, this command has {ours[key]!r}; "
                    "use another --out or repeat the original command to resume it"
                )
        if record.get("classnames") != list(self.classnames):
            raise FastpromptError(
                f"--out {self.out} holds a run on other classes than {self.config.data} ({self.config.classes}); use another --out"
            )
        prompts = {k.removeprefix("prompts."): v for k, v in tensors.items() if k.startswith("prompts.")}
        self.model.load_prompt_state_dict(prompts)
        self.optimizer.load_state_dict(checkpoint.optimizer_from_parts(record["optimizer"], tensors))
        self.epoch = int(record["epoch"])
        self.metrics = list(record["metrics"])
        set_rng_state(checkpoint.rng_from_json(record["rng"]))
        if self.is_main:
            with open(self.out / "metrics.jsonl", "w") as f:  # drop lines of epochs after the checkpoint
                for line in self.metrics:
                    f.write(json.dumps(line) + "\n")
        self._say(f"resuming {self.out} after epoch {self.epoch}/{self.config.epochs}")

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON record, tensors) of everything an exact resume needs."""
        tensors = {f"prompts.{k}": v for k, v in self.model.prompt_state_dict().items()}
        record = {
            "config": self.config.to_dict(),
            "classnames": list(self.classnames),
            "epoch": self.epoch,
            "optimizer": checkpoint.optimizer_to_parts(self.optimizer.state_dict(), tensors),
            "rng": checkpoint.rng_to_json(rng_state()),
            "metrics": self.metrics,
        }
        return record, tensors

    def save_checkpoint(self) -> None:
        if self.is_main:
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
        if self.distributed:  # each rank scored its shard; every entry is >= 0 on exactly the ranks that scored it
            dist.all_reduce(table, op=dist.ReduceOp.MAX)
        self._topk_table = table

    def _topk_for(self, indices: torch.Tensor) -> torch.Tensor:
        """The cached top-K [B, K_N] of a batch's training images (by .beton index)."""
        return self._topk_table[indices].to(self.device, non_blocking=True)  # (B, K_N)

    def _batches(self):
        """This epoch's batches: the FFCV loader, or the feature cache's view of the epoch."""
        if self.feature_cache is None:
            return self.loader
        cfg = self.config
        return self.feature_cache.batches(self.data, self.train_subset, cfg.classes, seed=cfg.seed, epoch=self.epoch,
                                          batch_size=cfg.batch_size, rank=self.rank, world=self.world)

    def train_epoch(self, progress: Optional[TrainProgress] = None) -> dict:
        cfg = self.config
        lr = {}
        for group in self.optimizer.param_groups:
            group["lr"] = lr[group["name"]] = cfg.lr_at(group["name"], self.epoch)
        self.model.train()
        self.model.set_epoch(self.epoch)
        self.loader.set_epoch(self.epoch)
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = seen = 0
        start = time.perf_counter()
        for step, batch in enumerate(self._batches()):
            images, labels = batch[0], batch[1]  # (b, 3, S, S) or cached features (b, D), (b,)
            topk = self._topk_for(batch[2]) if self.cached_topk else None
            with self.autocast():
                if self.feature_cache is not None:
                    loss, logits = self.step_fn(None, labels, features=images)
                else:
                    loss, logits = self.step_fn(images, labels, topk)
            loss_value = float(loss.detach())  # CPU-GPU sync: the non-finite check decides whether to step
            if not math.isfinite(loss_value):
                raise FastpromptError(
                    f"loss became {loss_value} at epoch {self.epoch + 1} step {step + 1}; the last good checkpoint "
                    f"(after epoch {self.epoch}) is kept in {self.out}; lower --lr or use --precision fp32"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            exit_after_step(self.epoch * len(self.loader) + step + 1)  # test hook: see training/hooks.py
            total_loss += loss_value * labels.shape[0]
            correct += int((logits.argmax(-1) == labels).sum())
            seen += labels.shape[0]
            if progress is not None:
                progress.step(total_loss, seen)
        stats = torch.tensor([float(total_loss), correct, seen], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(stats)
        seconds = time.perf_counter() - start
        total_loss, correct, seen = float(stats[0]), float(stats[1]), float(stats[2])
        return {"epoch": self.epoch + 1, "loss": total_loss / max(seen, 1), "train_accuracy": 100.0 * correct / max(seen, 1),
                "lr": lr, "images": int(seen), "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1)}

    def train(self) -> dict:
        """Train the remaining epochs, then evaluate on the test split; returns results.json's content."""
        cfg = self.config
        self._say(f"[bold]fastprompt train[/bold] {json.dumps(self.config.to_dict())}")
        progress = TrainProgress(self.console, cfg.epochs, len(self.loader), done=self.epoch, enabled=self.is_main)
        if self.cached_topk and self.epoch < cfg.epochs:
            self._build_topk_table()
        if cfg.feature_cache and self.epoch < cfg.epochs:
            self.feature_cache = FeatureCache.build(self.model, self.data, views=cfg.feature_cache, aug_seed=0,
                                                    device=self.device, batch_size=cfg.eval_batch_size,
                                                    num_workers=cfg.num_workers, autocast=self.autocast)
            if cfg.feature_cache < cfg.epochs:
                self._say(f"feature cache: {cfg.feature_cache} augmented views for {cfg.epochs} epochs; epoch e reuses "
                          f"view e mod {cfg.feature_cache} (a deliberate approximation of fresh augmentation)")
        mode = cfg.compile_mode(self.device.type)
        if mode is not None and self.epoch < cfg.epochs:
            progress.say("compiling the training step (first time on this machine: 1-2 minutes)" if not compile_cache_is_warm()
                         else "compiling the training step (from the compile cache: seconds)")
        with progress:
            while self.epoch < cfg.epochs:
                progress.start_epoch(self.epoch)
                line = self.train_epoch(progress)
                self.epoch += 1
                self.metrics.append(line)
                progress.end_epoch(line)
                if self.is_main:
                    with open(self.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(line) + "\n")
                    if self.on_epoch is not None:
                        self.on_epoch(line)
                if (cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0) or self.epoch == cfg.epochs:
                    self.save_checkpoint()
        results = self.final_evaluation()
        if self.is_main:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.prompt_state_dict().items()}
            atomic_write(self.out / "prompts.safetensors", lambda tmp: save_file(state, tmp))
            write_json(self.out / "results.json", results)
        return results

    def final_evaluation(self) -> dict:
        cfg = self.config
        evaluate_on = lambda model, classes: evaluate(model, self.data, "test", classes, device=self.device,
                                                     batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
                                                     autocast=self.autocast)
        results = {"method": cfg.method, "dataset": self.data.name, "shots": cfg.shots, "seed": cfg.seed,
                   "epochs": cfg.epochs, "classes": cfg.classes}
        if cfg.classes == "base":
            base = evaluate_on(self.model, "base")
            new_model = model_for_classes(self.model, self.data.classnames_for("new"))
            new = evaluate_on(new_model, "new")
            results.update(base_accuracy=base, new_accuracy=new, harmonic_mean=harmonic_mean(base, new))
            self._say(f"base {base:.2f}%  new {new:.2f}%  harmonic mean {results['harmonic_mean']:.2f}%")
        else:
            results["test_accuracy"] = evaluate_on(self.model, "all")
            self._say(f"test accuracy {results['test_accuracy']:.2f}%")
        return results

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def train(config: TrainConfig, console=None, on_epoch: Optional[Callable[[dict], None]] = None) -> dict:
    trainer = Trainer(config, console=console, on_epoch=on_epoch)
    try:
        return trainer.train()
    finally:
        trainer.close()
