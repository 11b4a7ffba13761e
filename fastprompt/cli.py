"""The `fastprompt` command line: parses arguments and delegates to library functions.

Every command turns `FastpromptError` into a one-line message and exit code 2, and so is
a parse error (unknown flag or command, a value outside an option's choices); nothing else
is caught here. Every command takes `-v/--verbose` (INFO logs on stderr through rich;
warnings always show). `train`'s method-option flags (`--coop.n-ctx`, ...) and per-group
recipe flags (`--lr.visual`, `--warmup-epochs.text`, ...) are generated from the method
registry when the command parses its arguments (`TrainCommand`), not listed here.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
from typing import Annotated, Any, Callable, Literal, Optional

import typer
from typer import _click
from typer.core import TyperCommand, TyperGroup

import fastprompt
from fastprompt.errors import FastpromptError


def _usage_error(ctx, err: Exception) -> None:
    """A parse error (unknown flag, bad choice, missing option) as the one line every fastprompt
    error is: `error: PROBLEM; see `COMMAND --help``, exit code 2."""
    problem = " ".join(err.format_message().replace("Value error, ", "").split()).rstrip(".")  # one line
    typer.echo(f"error: {problem}; see `{ctx.command_path} --help`", err=True)
    raise typer.Exit(code=2)


class Group(TyperGroup):
    """A fastprompt command group: an unknown command or flag is a one-line error (exit 2); its
    help polished as a command's (`_polish`: no `<bool>` after --version or --help)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            _polish(p)
        return params

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _click.exceptions.UsageError as err:
            _usage_error(ctx, err)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except _click.exceptions.UsageError as err:
            _usage_error(ctx, err)


app = typer.Typer(
    name="fastprompt",
    help="Fast, exact prompt tuning for CLIP: zero-shot, CoOp, CoCoOp, KgCoOp, VPT, VLP, IVLP, MaPLe, CAVPT, E2MIM. "
         "What each method computes, every default and its source, and the named protocols: docs/methods.md.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    cls=Group,
)


def user_errors(fn):
    """Turn a FastpromptError raised by `fn` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FastpromptError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=err.exit_code) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    """Log records on stderr through rich, each once: fastprompt's at INFO and up with --verbose
    (else warnings and errors), other libraries' warnings and errors. The handler sits on the
    root logger, so a library's bare `logging.info(...)` (open_clip's `create_model` calls one)
    finds it there and does not `basicConfig` a second, plain stderr handler that would print
    every record again. Replaces the handler a previous command in this process set."""
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_fastprompt", False)]:
        root.removeHandler(handler)
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
    handler._fastprompt = True
    root.addHandler(handler)
    logging.getLogger("fastprompt").setLevel(logging.INFO if verbose and _main_rank() else logging.WARNING)  # torchrun: rank 0 says more


def _main_rank() -> bool:
    """Not a torchrun process, or its rank 0: the one process that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


def _click_params(parameters: list[inspect.Parameter]) -> list:
    """Click parameters for `parameters` (each `Annotated[type, typer.Option(...)]`), built by
    Typer itself from a function with that signature."""

    def flags(**kwargs: Any) -> None: ...

    flags.__signature__ = inspect.Signature(parameters)
    holder = typer.Typer(add_completion=False)
    holder.command()(flags)
    return list(typer.main.get_command(holder).params)


def _flag(name: str, annotation, *decls: str, help: str, panel: Optional[str] = None, default=None,
          show_default: bool = False) -> inspect.Parameter:
    option = typer.Option(*decls, help=help, rich_help_panel=panel, show_default=show_default)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option])


def choice(values) -> Any:
    """`Literal[values]`: a flag whose value must be one of `values` (shown in --help, completed by the shell)."""
    return Literal[tuple(values)]


def _with_choices(param, values) -> Any:
    """`param` (a Typer option) rebuilt as a choice of `values`, with its flags, help, default and panel."""
    required = param.required
    annotation = choice(values) if required or param.default is not None else Optional[choice(values)]
    built = _flag(param.name, annotation, *param.opts, *param.secondary_opts, help=param.help,
                  panel=getattr(param, "rich_help_panel", None), show_default=param.show_default,
                  default=inspect.Parameter.empty if required else param.default)
    return _click_params([built])[0]


def _polish(param) -> None:
    """--help shows every help text literally (rich markup escaped: `[relative_path, ...]` is text,
    not a tag) and no `<bool>` after a flag."""
    from rich.markup import escape

    if getattr(param, "_polished", False):
        return
    if param.help:
        param.help = escape(param.help)
    if getattr(param, "is_flag", False):
        param.metavar = ""
    param._polished = True


class BaseCommand(TyperCommand):
    """A fastprompt command's parsing and help: `choices()` turns named options into real choices
    (their values come from the modules that own them, imported only when the command parses or
    prints help), help texts are polished (`_polish`), and a parse error is one line, exit 2."""

    def choices(self) -> dict[str, tuple]:
        """{parameter name: its allowed values}."""
        return {}

    def get_params(self, ctx):
        params = super().get_params(ctx)
        if getattr(self, "_chosen", None) is None:
            self._chosen = {name: _with_choices(p, self.choices()[name]) for p in params
                            for name in [p.name] if name in self.choices()}
        params = [self._chosen.get(p.name, p) for p in params]
        for p in params:
            _polish(p)
        return params

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _click.exceptions.UsageError as err:
            _usage_error(ctx, err)


class Command(BaseCommand):
    """A fastprompt command: its own parameters plus `extra_flags()`, which are built when the
    command parses arguments or prints help (so `fastprompt --version` imports nothing), and
    handed to the callback as `ctx.meta["flags"]` instead of as keyword arguments."""

    def extra_flags(self) -> list[inspect.Parameter]:
        return [_flag("verbose", bool, "--verbose", "-v", default=False,
                      help="Show INFO log messages (fallbacks, caps, resolved settings) on stderr; warnings always show.")]

    def get_params(self, ctx):
        if getattr(self, "_extra", None) is None:
            self._extra = _click_params(self.extra_flags())
            for p in self._extra:
                _polish(p)
        params = super().get_params(ctx)
        own = [p for p in params if p.name != "help"]
        return [*own, *self._extra, *[p for p in params if p.name == "help"]]

    def invoke(self, ctx):
        extra = {p.name: ctx.params.pop(p.name) for p in self._extra if p.name in ctx.params}
        _setup_logging(bool(extra.pop("verbose", False)))
        ctx.meta["flags"] = extra
        return super().invoke(ctx)


def command(typer_app: typer.Typer, name: str, cls: type = None, choices: Optional[Callable[[], dict]] = None,
            **settings: Any):
    """Register a command of class `cls` (default `Command`: with -v/--verbose) whose options
    named by `choices()` are real choices; `settings` go to Typer's `command` (epilog, ...)."""
    cls = cls or Command
    if choices is not None:
        cls = type(cls.__name__, (cls,), {"choices": lambda self: choices()})
    return typer_app.command(name, cls=cls, **settings)


def _given(ctx, name: str) -> bool:
    """Whether the command line (or the environment) gave parameter `name` a value, as opposed to
    its default. The ParameterSource is that of the click this command runs on (Typer's bundled
    one, `typer._click`): the standalone `click` package's enum never equals it, which once made
    every flag look given and `--protocol` apply nothing (issue 21)."""
    return ctx.get_parameter_source(name) in (_click.core.ParameterSource.COMMANDLINE,
                                              _click.core.ParameterSource.ENVIRONMENT,
                                              _click.core.ParameterSource.PROMPT)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fastprompt {fastprompt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Fast, exact prompt tuning for CLIP-like vision-language models."""


@command(app, "methods")
def methods_cmd() -> None:
    """List the prompt-tuning methods this engine implements: name, what it learns, its paper."""
    from fastprompt.methods import METHODS

    width = max(map(len, METHODS))
    for name, spec in METHODS.items():
        typer.echo(f"{name:<{width}}  {spec.summary}. {spec.paper}")


@command(app, "protocols")
@user_errors
def protocols_cmd(
    names: Annotated[Optional[list[str]], typer.Argument(help="Protocols to show (default: all).")] = None,
) -> None:
    """Print each named protocol (`train --protocol NAME`): every setting, its value and its source."""
    from rich.console import Console

    from fastprompt.training.protocols import protocol_tables

    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # piped or redirected: keep each setting on few lines
    for table in protocol_tables(names):
        console.print(table)


# ----------------------------------------------------------------------------------------
# prepare: datasets -> .beton (data layer, fastprompt/data)
# ----------------------------------------------------------------------------------------

prepare_app = typer.Typer(
    cls=Group,
    help="Write a dataset as an FFCV .beton with its .json sidecar (class names, template, splits), or the demo CLIP.",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")


@command(prepare_app, "imagefolder")
@user_errors
def prepare_imagefolder_cmd(
    root: Annotated[str, typer.Argument(help="Folder of class folders (or train/ val/ test/ of class folders); the split file's paths are relative to it.")],
    out: Annotated[str, typer.Option("--out", help="Output NAME.beton; the sidecar NAME.json goes beside it.")],
    split_json: Annotated[Optional[str], typer.Option("--split-json", help="CoOp split file split_zhou_<Name>.json ([relative_path, label, classname] lists).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Dataset name (default: from the split file's name, else ROOT's folder name); known CoOp datasets get their template and class names.")] = None,
    classnames: Annotated[Optional[str], typer.Option("--classnames", help="Text file of 'folder classname' lines (e.g. ImageNet's wnids).")] = None,
    max_resolution: Annotated[int, typer.Option("--max-resolution", help="Longest side of a stored training image, px.")] = 1024,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality of the stored training images (1-100).")] = 90,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Writer processes (default: the available cores).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable images out (and report how many) instead of failing.")] = False,
    train_short_side: Annotated[int, typer.Option("--train-short-side", help="Shorter side of a stored training image at most this, px (random-resized-crop source).")] = 320,
    eval_size: Annotated[int, typer.Option("--eval-size", help="The model's input size: val/test are stored as CLIP's eval transform at this size.")] = 224,
    eval_format: Annotated[str, typer.Option("--eval-format", help="Evaluation images: raw (CLIP's pixels exactly) or jpg (--jpeg-quality; smaller, approximate).")] = "raw",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing NAME.beton or NAME.json (refused without it).")] = False,
) -> None:
    """Write a folder of images (with a CoOp split file, split folders, or a stratified split) as a .beton."""
    from fastprompt.data import write_imagefolder

    summary = write_imagefolder(
        root, out, split_json=split_json, name=name, classnames_file=classnames, max_resolution=max_resolution,
        jpeg_quality=jpeg_quality, workers=workers, skip_bad=skip_bad, train_short_side=train_short_side,
        eval_size=eval_size, eval_format=eval_format, overwrite=overwrite,
    )
    typer.echo(summary.line())


@command(prepare_app, "coop")
@user_errors
def prepare_coop_cmd(
    name: Annotated[Optional[str], typer.Argument(help="One of CoOp's datasets (see --list), e.g. eurosat or EuroSAT.")] = None,
    root: Annotated[Optional[str], typer.Argument(help="$DATA (the folder holding CoOp's dataset folders) or the dataset's own folder.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Output NAME.beton (default: ./<name>.beton); the sidecar NAME.json goes beside it.")] = None,
    list_datasets: Annotated[bool, typer.Option("--list", help="Print the datasets: names, class counts and the layout expected under ROOT.")] = False,
    max_resolution: Annotated[int, typer.Option("--max-resolution", help="Longest side of a stored training image, px.")] = 1024,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality of the stored training images (1-100).")] = 90,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Writer processes (default: the available cores).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave unreadable images out (and report how many) instead of failing.")] = False,
    train_short_side: Annotated[int, typer.Option("--train-short-side", help="Shorter side of a stored training image at most this, px (random-resized-crop source).")] = 320,
    eval_size: Annotated[int, typer.Option("--eval-size", help="The model's input size: val/test are stored as CLIP's eval transform at this size.")] = 224,
    eval_format: Annotated[str, typer.Option("--eval-format", help="Evaluation images: raw (CLIP's pixels exactly) or jpg (--jpeg-quality; smaller, approximate).")] = "raw",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing NAME.beton or NAME.json (refused without it).")] = False,
) -> None:
    """Write one of CoOp's datasets (11 + 4 ImageNet variants), laid out as CoOp's DATASETS.md says, as a .beton."""
    from fastprompt.data.coop import coop_table_lines, write_coop

    if list_datasets:
        typer.echo("\n".join(coop_table_lines()))
        return
    if name is None or root is None:
        raise FastpromptError("give NAME and ROOT, e.g. `fastprompt prepare coop eurosat $DATA`; --list prints the names")
    summary = write_coop(name, root, out, max_resolution=max_resolution, jpeg_quality=jpeg_quality, workers=workers,
                         skip_bad=skip_bad, train_short_side=train_short_side, eval_size=eval_size,
                         eval_format=eval_format, overwrite=overwrite)
    typer.echo(summary.line())


@command(prepare_app, "demo")
@user_errors
def prepare_demo_cmd(
    out: Annotated[str, typer.Option("--out", help="Output NAME.beton; the sidecar NAME.json goes beside it.")] = "demo.beton",
    images_per_class: Annotated[int, typer.Option("--images-per-class", help="Images per class, split 50/20/30 into train/val/test.")] = 50,
    size: Annotated[int, typer.Option("--size", help="Side of the square images, px.")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="The set is a function of the seed.")] = 0,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Writer processes (default: the available cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing NAME.beton or NAME.json (refused without it).")] = False,
) -> None:
    """Write the built-in demo set: 10 classes of coloured shapes ("red circle", ...) on random backgrounds."""
    from fastprompt.data import write_demo

    summary = write_demo(out, images_per_class=images_per_class, image_size=size, seed=seed, workers=workers,
                         overwrite=overwrite)
    typer.echo(summary.line())


@command(prepare_app, "demo-clip")
@user_errors
def prepare_demo_clip_cmd(
    out: Annotated[str, typer.Option("--out", help="Output checkpoint NAME.pt; use it as --clip fastprompt-tiny --pretrained NAME.pt.")] = "demo-clip.pt",
    steps: Annotated[int, typer.Option("--steps", help="Contrastive training steps (0.06-0.13 s each measured on 2 idle AMD EPYC cores, no GPU; about 1 s with other jobs on them).")] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Weights, images and sampling are functions of the seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing checkpoint at --out (refused without it).")] = False,
) -> None:
    """Pretrain fastprompt-tiny on synthetic colour-shape captions (never the demo's classes): a small CLIP that knows something."""
    from fastprompt.training.pretrain import PretrainConfig, pretrain_clip

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    config = PretrainConfig(steps=steps, seed=seed)
    columns = (TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=_console()) as progress:
        task = progress.add_task("pretrain", total=steps, loss=float("nan"))
        summary = pretrain_clip(out, config, progress=lambda step, loss: progress.update(task, completed=step, loss=loss),
                                overwrite=overwrite)
    typer.echo(summary.line())


@command(app, "verify")
@user_errors
def verify_cmd(
    data: Annotated[str, typer.Argument(help="A .beton from `fastprompt prepare` (its .json sidecar beside it).")],
) -> None:
    """Check a .beton against its sidecar: header, tables, labels and splits, and the whole file's checksum."""
    from fastprompt.data.beton import verify_dataset

    typer.echo(verify_dataset(data).line())


# ----------------------------------------------------------------------------------------
# train / eval / zeroshot
# ----------------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(stderr=True)


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in ("auto", "cpu", "cuda", "cuda:0") if d.startswith(incomplete)]


# --device stays text (cuda:N is any N); the library checks it and names the fix
Device = Annotated[str, typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", autocompletion=_complete_device,
                                     help="Where to run (auto: cuda when available).")]
Precision = Annotated[str, typer.Option("--precision", help="bf16 or fp32 (auto: bf16 autocast on cuda, fp32 on cpu).")]


def _run_choices() -> dict[str, tuple]:
    """The choices of the run flags that train, eval, zeroshot and sweep share, from their owners."""
    from fastprompt.settings import BACKENDS, PRECISIONS
    from fastprompt.training.config import CLASS_CHOICES, COMPILE_CHOICES, FINAL_MODELS, OPTIMIZERS

    return {"classes": CLASS_CHOICES, "precision": PRECISIONS, "optimizer": OPTIMIZERS, "backend": BACKENDS,
            "compile": COMPILE_CHOICES, "final_model": FINAL_MODELS}


def _train_choices() -> dict[str, tuple]:
    from fastprompt.methods import METHODS
    from fastprompt.training.config import NAN_POLICIES, TRAIN_CLASSES
    from fastprompt.training.protocols import PROTOCOLS

    trainable = tuple(name for name, spec in METHODS.items() if spec.groups)
    return {**_run_choices(), "classes": TRAIN_CLASSES, "method": trainable, "nan_policy": NAN_POLICIES,
            "protocol": tuple(PROTOCOLS)}


def _sweep_choices() -> dict[str, tuple]:
    from fastprompt.sweep.grid import LAUNCHERS

    return {**_train_choices(), "launcher": LAUNCHERS}


def _bench_choices() -> dict[str, tuple]:
    from fastprompt.training.compiled import COMPILE_MODES

    return {"compile_mode": COMPILE_MODES}
def _printed(result: dict) -> dict:
    """A result as train and eval print it on stdout: the saved file's content without the
    confusion matrices (K x K counts: a million numbers on ImageNet), which stay in the file."""
    return {k: v for k, v in result.items() if not k.endswith("confusion")}


Workers = Annotated[Optional[int], typer.Option("--workers", help="Loader threads (default: the available cores).")]
EVAL_EVERY_HELP = ("Score the run's few-shot val subset (min(shots, 4) per class) every E epochs and after the last: "
                   "val_accuracy in metrics.jsonl and TensorBoard (0: never). Changes nothing trained.")
FINAL_MODEL_HELP = ("The model results.json and prompts.safetensors report: last (the last epoch's, as CoOp's configs) or "
                    "best-val (the epoch with the best val accuracy, Dassl's TEST.FINAL_MODEL best_val; needs --eval-every).")
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="Let a --pretrained file that needs a full unpickle load (it can run code).")]


class TrainCommand(Command):
    """`fastprompt train`: also one flag per method option (`--{prefix}.{option}`, from the
    options dataclasses of the registered methods) and per parameter group (`--lr.{group}`,
    `--warmup-epochs.{group}`); only the flags given reach the config."""

    def extra_flags(self) -> list[inspect.Parameter]:
        from fastprompt.methods import METHODS
        from fastprompt.methods.registry import group_names, option_flags

        flags = super().extra_flags()
        for fl in option_flags():
            shown = "" if fl.default is None else f" (default: {'on' if fl.default is True else 'off' if fl.default is False else fl.default})"
            text = (fl.help[:1].upper() if fl.help[:1].isascii() else fl.help[:1]) + fl.help[1:] + shown + "."
            decls = (f"{fl.flag}/{fl.off_flag}",) if fl.type is bool else (fl.flag,)
            kind = choice(fl.choices) if fl.choices else fl.type
            flags.append(_flag(f"option__{fl.field}", Optional[kind], *decls, help=text, panel="Method options"))
        groups = {g.name: g for spec in reversed(list(METHODS.values())) for g in spec.groups}
        for name in group_names():
            g = groups[name]
            imagenet = f", {g.imagenet_warmup_epochs} on ImageNet" if g.imagenet_warmup_epochs is not None else ""
            flags.append(_flag(f"lr__{name}", Optional[float], f"--lr.{name}", panel="Parameter groups",
                               help=f"Peak learning rate of the {name} group (default {g.lr}); overrides --lr."))
            flags.append(_flag(f"warmup__{name}", Optional[int], f"--warmup-epochs.{name}", panel="Parameter groups",
                               help=f"Warm-up epochs of the {name} group (default {g.warmup_epochs}{imagenet}); overrides --warmup-epochs."))
        return flags


@command(app, "train", cls=TrainCommand, choices=_train_choices,
         epilog="Each method's equations, every option's default and its source (paper or published code), the "
                "parameter groups and the protocols: docs/methods.md in the repository.")
@user_errors
def train_cmd(
    ctx: typer.Context,
    data: Annotated[str, typer.Option("--data", help="A .beton from `fastprompt prepare` (its .json sidecar beside it).")],
    method: Annotated[Optional[str], typer.Option("--method", help="A method from `fastprompt methods` that trains something (zeroshot is `fastprompt zeroshot`); default: the --protocol's method, where it names one.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Run directory (default: a folder in runs/ named by method, data, shots, seed, CLIP, weights and a hash of the setting). The same setting resumes; another is refused. With --seeds: the folder of the seeds' runs, OUT/seedS.")] = None,
    clip: Annotated[str, typer.Option("--clip", help="open_clip model name, or fastprompt-tiny.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, a checkpoint file, or none (random weights).")] = "openai",
    template: Annotated[Optional[str], typer.Option("--template", help="Hand-crafted template with {} (default: the dataset's); 'ensemble' for CLIP's 7.")] = None,
    shots: Annotated[int, typer.Option("--shots", help="Training images per class (0: all).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Few-shot sample, init, order and augmentation.")] = 1,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Comma-separated seeds, e.g. 1,2,3: one run per seed, one after another, each its own run directory: OUT/seedS under --out (a folder of runs, not a run), else each seed's default folder in runs/. Instead of --seed.")] = None,
    pack: Annotated[str, typer.Option("--pack", metavar="<off|auto|N>", help="With --seeds: train the seeds' runs together, packed (one pass of the frozen towers a step, each run's own prompts, draw, order, optimiser, checkpoints and results; the same run directories as alone): off, auto (as many as fit the device's memory, measured; 1 when packing gains nothing) or N. Packs the runs of a method that declares it (docs/methods.md) with pretrained weights; the others train alone.")] = "off",
    classes: Annotated[str, typer.Option("--classes", help="base: train on the base half of the classes, evaluate base and new (base-to-new).")] = "all",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default (CoOp): 50 for 1 shot, 100 for 2-4, 200 for 8-16; 50 on ImageNet.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (with momentum: the papers') or adamw.")] = "sgd",
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of every parameter group (default: each group's, see --lr.GROUP); Dassl's cosine after warm-up.")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs", help="Constant-lr warm-up epochs of every group (default: each group's, see --warmup-epochs.GROUP).")] = None,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", help="Learning rate during warm-up.")] = 1e-5,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum, every group.")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="Weight decay, every group.")] = 5e-4,
    device: Device = "auto",
    precision: Precision = "auto",
    backend: Annotated[str, typer.Option("--backend", help="fast (Triton kernels where they help) or reference (the eager oracle).")] = "fast",
    compile: Annotated[str, typer.Option("--compile", help="torch.compile the training step: auto (on cuda only), off, or an inductor mode.")] = "auto",
    workers: Workers = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Epochs between checkpoints (0: only at the end).")] = 1,
    feature_cache: Annotated[int, typer.Option("--feature-cache", help="Methods with a frozen image tower (coop, e2mim): cache V augmented views of the image features (0: off).")] = 0,
    decoded_cache: Annotated[str, typer.Option("--decoded-cache", metavar="<auto|off|SIZE>", help="Decode the few-shot training images once into memory (H x W x 3 bytes each as stored, e.g. 410 KB at 320 x 427) and crop every epoch from them: the same batches as decoding every epoch. auto: when they fit in a quarter of the memory available at the start; off: decode every epoch; SIZE (8G, 512M): when they fit in SIZE. Under torchrun the ranks of a machine share one copy.")] = "auto",
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Write per-epoch scalars to OUT/tensorboard (torch.utils.tensorboard).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint; fail if it has none.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Remove the run in --out (any setting) and train from the start.")] = False,
    force_eval: Annotated[bool, typer.Option("--force-eval", help="Evaluate a finished run in --out again (default: print where its results are).")] = False,
    nan_policy: Annotated[str, typer.Option("--nan-policy", help="Non-finite loss: stop (exit 2 naming epoch and step) or skip (skip the step, count it in metrics).")] = "stop",
    eval_every: Annotated[int, typer.Option("--eval-every", help=EVAL_EVERY_HELP)] = 0,
    final_model: Annotated[str, typer.Option("--final-model", help=FINAL_MODEL_HELP)] = "last",
    trust_pickle: TrustPickle = False,
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="A published recipe by name (`fastprompt protocols` shows each, docs/methods.md explains them): sets every default that table used, the method too where it names one; flags given explicitly win.")] = None,
) -> None:
    """Train prompts on a .beton and evaluate them on its test split."""
    from fastprompt.methods.registry import check_option_flags
    from fastprompt.training.config import TrainConfig
    from fastprompt.training.plan import check_request, parse_pack, plan_run, plan_seeds
    from fastprompt.training.protocols import resolve_method
    from fastprompt.training.rundir import check_out

    if pack != "off":
        parse_pack(pack)  # a bad value answers before anything else
        if seeds is None:
            raise FastpromptError(f"--pack {pack} packs the runs of --seeds; one run trains alone: drop --pack")

    method_given = method is not None
    method = resolve_method(method, protocol)  # --method, else the protocol's default method
    flags = {name: value for name, value in ctx.meta["flags"].items() if value is not None}
    options = {name.removeprefix("option__"): v for name, v in flags.items() if name.startswith("option__")}
    check_option_flags(method, options)
    group_lr = {name.removeprefix("lr__"): v for name, v in flags.items() if name.startswith("lr__")}
    group_warmup = {name.removeprefix("warmup__"): v for name, v in flags.items() if name.startswith("warmup__")}
    if resume and restart:
        raise FastpromptError("--resume and --restart contradict each other; pass one")
    seed_list = None
    if seeds is not None:
        if _given(ctx, "seed"):
            raise FastpromptError("--seed and --seeds both given; pass --seed S for one run or --seeds S1,S2,... for one "
                                  "run per seed")
        seed_list = _int_list("seeds", seeds)
    settings = dict(
        method=method, data=data, out=out or "", clip=clip, pretrained=pretrained, template=template,
        shots=shots or None, seed=seed_list[0] if seed_list else seed, classes=classes, epochs=epochs,
        batch_size=batch_size, optimizer=optimizer, lr=lr,
        warmup_epochs=warmup_epochs, group_lr=group_lr, group_warmup_epochs=group_warmup, warmup_lr=warmup_lr,
        momentum=momentum, weight_decay=weight_decay,
        device=device, precision=precision, backend=backend, compile=compile, num_workers=workers,
        checkpoint_every=checkpoint_every, feature_cache=feature_cache, options=options, nan_policy=nan_policy,
        trust_pickle=trust_pickle, decoded_cache=decoded_cache, eval_every=eval_every, final_model=final_model,
    )
    # the names the command line set (a plan's "cli" source); the generated flags hold only given values
    given = {k for k in settings if _given(ctx, "workers" if k == "num_workers" else k)} | {"data"}
    given |= {"method"} if method_given else set()
    given |= {"out"} if out is not None else set()
    given |= {f"options.{k}" for k in options}
    if protocol is None:
        request = TrainConfig(**settings)
    else:  # the protocol fills what the command line left at its default
        request = TrainConfig.from_protocol(protocol, **{k: v for k, v in settings.items() if k in given or k in (
            "method", "out", "options", "group_lr", "group_warmup_epochs")})
    mode = "resume" if resume else "restart" if restart else "auto"
    if out is not None and (seed_list is None or not out.strip()):
        check_out(out)  # the folder first, as the trainer checks it: a refused --out says so before the recipe is resolved
    plans = ([plan_run(request, given=given, mode=mode)] if seed_list is None
             else plan_seeds(request, seed_list, given=given, mode=mode))
    for plan in plans:
        check_request(plan)  # planned and its folder checked: bad input answers before torch loads
    from fastprompt.training import execute

    loggers = {}

    def tensorboard_of(plan):
        from fastprompt.training.tensorboard import TensorBoardLogger

        loggers[plan.out] = TensorBoardLogger(plan.out / "tensorboard")
        return loggers[plan.out]

    def show(plan, results: dict, error) -> None:  # error: None (a failure is raised: keep_going off)
        if _main_rank():
            if plan.out in loggers:
                loggers[plan.out].final(results)
            typer.echo(json.dumps(_printed(results)))

    try:
        execute(plans, console=_console(), pack=parse_pack(pack), on_epoch=tensorboard_of if tensorboard else None,
                on_result=show, force_eval=force_eval)
    finally:
        for logger in loggers.values():
            logger.close()


@command(app, "eval", choices=_run_choices)
@user_errors
def eval_cmd(
    run: Annotated[str, typer.Argument(help="The --out directory of a finished `fastprompt train`.")],
    data: Annotated[str, typer.Option("--data", help="The .beton to evaluate on (any dataset).")],
    classes: Annotated[str, typer.Option("--classes", help="Every class, the base half or the new half (base-to-new).")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per evaluation batch.")] = 128,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    trust_pickle: TrustPickle = False,
) -> None:
    """Evaluate a run's prompts on the test split of a dataset (cross-dataset, base-to-new, domains)."""
    from fastprompt.training.runfiles import check_evaluation

    check_evaluation(run, data, classes, device, precision)  # bad input answers before torch loads
    from fastprompt.training import evaluate_run
    from fastprompt.training.evaluate import ResultNotSaved

    try:
        result = evaluate_run(run, data, classes, device=device, precision=precision, batch_size=batch_size,
                              num_workers=workers, trust_pickle=trust_pickle)
    except ResultNotSaved as err:  # the result on stdout all the same; the error line and exit 2 say it is not on disk
        typer.echo(json.dumps(_printed(err.result)))
        raise
    _console().print(f"test accuracy {result['test_accuracy']:.2f}% ({result['dataset']}, classes {classes}); "
                     f"saved beside the run", highlight=False, soft_wrap=True)  # the human line; JSON on stdout
    typer.echo(json.dumps(_printed(result)))


@command(app, "zeroshot", choices=_run_choices)
@user_errors
def zeroshot_cmd(
    data: Annotated[str, typer.Option("--data", help="A .beton from `fastprompt prepare`.")],
    clip: Annotated[str, typer.Option("--clip", help="open_clip model name, or fastprompt-tiny.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, checkpoint file, or none.")] = "openai",
    template: Annotated[Optional[str], typer.Option("--template", help="Default: the dataset's; 'ensemble' for CLIP's 7.")] = None,
    classes: Annotated[str, typer.Option("--classes", help="Every class, the base half or the new half (base-to-new).")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per evaluation batch.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seeds random weights with --pretrained none.")] = 1,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    trust_pickle: TrustPickle = False,
) -> None:
    """Zero-shot CLIP accuracy on the test split of a dataset."""
    from fastprompt.training import zeroshot_eval

    result = zeroshot_eval(data, clip=clip, pretrained=pretrained, template=template, classes=classes, device=device,
                           precision=precision, batch_size=batch_size, num_workers=workers, seed=seed,
                           trust_pickle=trust_pickle)
    typer.echo(json.dumps(result))


# ----------------------------------------------------------------------------------------
# bench: training-step throughput and peak memory per method and variant (fastprompt/bench/)
# ----------------------------------------------------------------------------------------


def _comma_list(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _int_list(flag: str, text: str) -> list[int]:
    """--FLAG 1,2,3 -> [1, 2, 3]; anything but integers is one line naming the flag."""
    try:
        return [int(v) for v in _comma_list(text) or ()]
    except ValueError:
        raise FastpromptError(f"--{flag} {text!r} must be comma-separated integers, e.g. 1,2,3") from None


def _pack_sizes(value: Optional[str]) -> tuple[int, ...]:
    """--pack 1,2,4,8 -> (1, 2, 4, 8); None -> () (no pack dimension)."""
    sizes = _comma_list(value) or ()
    bad = [v for v in sizes if not v.isdigit()]
    if bad or (value is not None and not sizes):
        raise FastpromptError(f"--pack {value!r}: give numbers of runs separated by commas, such as 1,2,4,8")
    return tuple(int(v) for v in sizes)


@command(app, "bench", choices=_bench_choices)
@user_errors
def bench_cmd(
    clip: Annotated[str, typer.Option("--clip", help="open_clip model name, or fastprompt-tiny.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, a checkpoint file, or none (random weights; speed does not depend on them).")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step.")] = 16,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes to simulate ('class 0' .. 'class N-1').")] = 100,
    device: Device = "auto",
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods and coop-text (the CoOp text step alone); default: coop-text, vpt-deep.")] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated: reference, fast, fast+compile, anchor (default: reference, fast).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every method and variant (compilation and the anchor baselines too). The default grid took 42 s on 2 idle CPU cores (AMD EPYC, no GPU) and 3-4 min with other jobs on them (BENCHMARKS.md).")] = False,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per variant (the median is reported; use 5 or more on a busy machine).")] = 2,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps before them (compilation gets its own).")] = 1,
    compile_mode: Annotated[str, typer.Option("--compile-mode", help="torch.compile mode of fast+compile.")] = "default",
    seed: Annotated[int, typer.Option("--seed", help="Random weights, prompts, images and labels.")] = 0,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the records (a JSON list, rewritten after each method) to this file.")] = None,
    pack: Annotated[Optional[str], typer.Option("--pack", help="Comma-separated runs per packed step, e.g. 1,2,4,8: each packing method's reference/fast/fast+compile step with N runs of --batch-size images (1: the solo step); reports images/s in all and per run.")] = None,
) -> None:
    """Training-step images/s and peak memory: reference vs fast vs fast+compile vs an anchor-style baseline."""
    from fastprompt.bench import VARIANTS, BenchConfig, bench_methods, check_records_path, header_line, record_line, run_bench, write_records
    from fastprompt.runtime import resolve_device

    if every and (methods or variants):
        raise FastpromptError("--all measures every method and variant; drop --methods / --variants, or drop --all")
    options = {"methods": tuple(bench_methods()) if every else _comma_list(methods),
               "variants": VARIANTS if every else _comma_list(variants)}
    config = BenchConfig(clip=clip, pretrained=pretrained, batch_size=batch_size, classes=classes, device=device,
                         steps=steps, warmup=warmup, compile_mode=compile_mode, seed=seed, packs=_pack_sizes(pack),
                         **{k: v for k, v in options.items() if v is not None})
    if json_out:
        check_records_path(json_out)
    records: list[dict] = []
    console = _console()
    # On a terminal a spinner shows what is measured now (cleared before each line of the table is
    # printed); elsewhere (a log file, a pipe) each step is a line on stderr, with the time so far.
    status = console.status("bench") if console.is_terminal else None
    started, titled = time.monotonic(), []  # titled: [True] once the title and header are printed

    def table(lines: list[str]) -> None:
        if status is not None:
            status.stop()  # transient: the spinner's line is erased, not left in front of the table
        if not titled:  # the title once the model loaded: a bad --clip stays a one-line error
            titled.append(True)
            lines = [f"fastprompt bench: {clip}, batch {batch_size}, {classes} classes, {device}",
                     header_line(resolve_device(device).type, packs=bool(config.packs)), *lines]
        for line in lines:
            typer.echo(line)
        if status is not None:
            status.start()

    def progress(what: str) -> None:
        if not titled:
            table([])
        if status is not None:
            status.update(f"bench: {what}")
        else:
            elapsed = int(time.monotonic() - started)
            typer.echo(f"bench {elapsed // 60}m{elapsed % 60:02d}s: {what}", err=True)

    def show(done: list[dict]) -> None:  # each method's records as soon as they are measured
        records.extend(done)
        table([record_line(record) for record in done])
        if json_out:
            write_records(records, json_out)

    try:
        if status is not None:
            status.start()
        run_bench(config, progress=progress, on_records=show)
    finally:
        if status is not None:
            status.stop()


# ----------------------------------------------------------------------------------------
# sweep / report / plot shots: paper tables (fastprompt/sweep)
# ----------------------------------------------------------------------------------------


def _set_options(pairs: Optional[list[str]]) -> dict:
    """--set key=value (repeatable) -> method options; values read as JSON (4, true, 0.5), else text."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FastpromptError(f"--set {pair!r} is not key=value; e.g. --set n_ctx=4")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except ValueError:
            options[key.strip().replace("-", "_")] = value
    return options


class SweepCommand(TrainCommand):
    """`fastprompt sweep`: the train command's generated method-option and parameter-group flags,
    shared by every cell (an option reaches the grid's methods that have it, a group's flag the
    methods that train that group)."""


@command(app, "sweep", cls=SweepCommand, choices=_sweep_choices)
@user_errors
def sweep_cmd(
    ctx: typer.Context,
    data: Annotated[str, typer.Option("--data", help="Comma-separated .beton files.")],
    out: Annotated[str, typer.Option("--out", help="Sweep folder: sweep.json, sweep-log.jsonl, DATASET/METHOD/shotsK/seedS/.")],
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods, e.g. coop,cavpt; default: the --protocol's method, where it names one.")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds.")] = "1,2,3",
    shots: Annotated[str, typer.Option("--shots", help="Comma-separated shots per class (0: all).")] = "16",
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="Cells at once (default: 1 per visible GPU, 1 on CPU).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid and what would be skipped, resumed and started.")] = False,
    eval_on: Annotated[Optional[str], typer.Option("--eval-on", help="Comma-separated .beton files every cell is also evaluated on (cross-dataset).")] = None,
    launcher: Annotated[str, typer.Option("--launcher", help="Where cells run: here, on Slurm, or through submitit's local executor.")] = "local",
    slurm_partition: Annotated[Optional[str], typer.Option("--slurm-partition", help="Slurm partition of the jobs (default: the cluster's).")] = None,
    slurm_gpus: Annotated[int, typer.Option("--slurm-gpus", help="GPUs per cell.")] = 1,
    slurm_time: Annotated[int, typer.Option("--slurm-time", help="Minutes per cell; a cell that runs out is requeued and resumes.")] = 240,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Per-epoch scalars of every cell in CELL/tensorboard.")] = False,
    pack: Annotated[str, typer.Option("--pack", metavar="<off|auto|N>", help="Train cells of one dataset, backbone and weights, method, options, shots, batch size and epochs together in one worker, packed (one pass of the frozen towers a step; each cell's own prompts, draw, order, optimiser, checkpoints and results: the same run folders as alone): off, auto (as many as fit the device's memory, measured; 1 when packing gains nothing) or at most N. Packs the methods that declare it (docs/methods.md) with pretrained weights; the others train alone.")] = "auto",
    set_options: Annotated[Optional[list[str]], typer.Option("--set", help="Method option key=value (repeatable), for the methods that have it, e.g. --set n_ctx=4.")] = None,
    clip: Annotated[Optional[str], typer.Option("--clip", help="As in `fastprompt train`; shared by every cell.")] = None,
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", help="As in `fastprompt train`; shared by every cell.")] = None,
    template: Annotated[Optional[str], typer.Option("--template", help="As in `fastprompt train`; shared by every cell.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="As in `fastprompt train`; shared by every cell.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="As in `fastprompt train`; shared by every cell.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="As in `fastprompt train`; shared by every cell.")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="As in `fastprompt train`; shared by every cell.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="As in `fastprompt train`; shared by every cell.")] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs", help="As in `fastprompt train`; shared by every cell.")] = None,
    warmup_lr: Annotated[Optional[float], typer.Option("--warmup-lr", help="As in `fastprompt train`; shared by every cell.")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="As in `fastprompt train`; shared by every cell.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="As in `fastprompt train`; shared by every cell.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", autocompletion=_complete_device,
                                                  help="As in `fastprompt train`; shared by every cell.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="As in `fastprompt train`; shared by every cell.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="As in `fastprompt train`; shared by every cell.")] = None,
    compile: Annotated[Optional[str], typer.Option("--compile", help="As in `fastprompt train`; shared by every cell.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Loader threads per cell (default: its share of the cores).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="As in `fastprompt train`; shared by every cell.")] = None,
    feature_cache: Annotated[Optional[int], typer.Option("--feature-cache", help="As in `fastprompt train`; shared by every cell.")] = None,
    decoded_cache: Annotated[Optional[str], typer.Option("--decoded-cache", metavar="<auto|off|SIZE>", help="As in `fastprompt train`; per cell (each cell decodes its training images once).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="As in `fastprompt train`; shared by every cell.")] = None,
    final_model: Annotated[Optional[str], typer.Option("--final-model", help="As in `fastprompt train`; shared by every cell.")] = None,
    protocol: Annotated[Optional[str], typer.Option("--protocol", help="As in `fastprompt train` (`fastprompt protocols`); the flags given here win.")] = None,
) -> None:
    """Run a grid of datasets x methods x shots x seeds, one run folder per cell; resumable."""
    from fastprompt.sweep import SweepConfig, prepare, run_sweep
    from fastprompt.sweep.runner import plan_table, sweep_jobs
    from fastprompt.training.protocols import resolve_method

    given = dict(locals())
    flags = {name: value for name, value in ctx.meta["flags"].items() if value is not None}
    method_options = {name.removeprefix("option__"): v for name, v in flags.items() if name.startswith("option__")}
    group_lr = {name.removeprefix("lr__"): v for name, v in flags.items() if name.startswith("lr__")}
    group_warmup = {name.removeprefix("warmup__"): v for name, v in flags.items() if name.startswith("warmup__")}
    train_fields = ("clip", "pretrained", "template", "classes", "epochs", "batch_size", "optimizer", "lr",
                    "warmup_epochs", "warmup_lr", "momentum", "weight_decay", "device", "precision", "backend",
                    "compile", "checkpoint_every", "feature_cache", "decoded_cache", "eval_every", "final_model", "protocol")
    shared = {k: given[k] for k in train_fields if given[k] is not None}
    if workers is not None:
        shared["num_workers"] = workers
    if group_lr:
        shared["group_lr"] = group_lr
    if group_warmup:
        shared["group_warmup_epochs"] = group_warmup

    config = SweepConfig(
        methods=list(_comma_list(methods) if methods is not None else [resolve_method(None, protocol, "--methods")]), data=list(_comma_list(data)), seeds=_int_list("seeds", seeds),
        shots=[s or None for s in _int_list("shots", shots)], out=out, train=shared, options={**method_options, **_set_options(set_options)},
        eval_on=list(_comma_list(eval_on) or ()), jobs=jobs, launcher=launcher, slurm_partition=slurm_partition,
        slurm_gpus=slurm_gpus, slurm_time=slurm_time, tensorboard=tensorboard, pack=pack,
    )
    try:
        planned = prepare(config)
        if dry_run:
            from rich.console import Console

            Console().print(plan_table(planned, sweep_jobs(config, planned), config.pack))
            return
        outcome = run_sweep(config, console=_console(), planned=planned)
    except KeyboardInterrupt:  # Ctrl-C or kill -INT: the running cells were stopped, each resumable
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(code=130) from None
    typer.echo(f"{len(outcome.done)} done, {len(outcome.skipped)} skipped, {len(outcome.failed)} failed")
    for name, error in outcome.failed.items():
        typer.echo(f"failed: {name}: {error}", err=True)
    if not outcome.ok:
        raise typer.Exit(code=1)


def _report_choices() -> dict[str, tuple]:
    from fastprompt.sweep.report import AXES, FORMATS, METRICS

    return {"format": FORMATS, "cols": AXES, "metric": tuple(METRICS)}  # --rows: an axis, then method options (report.parse_rows checks it)


@command(app, "report", cls=BaseCommand, choices=_report_choices)
@user_errors
def report_cmd(
    folder: Annotated[str, typer.Argument(help="A sweep's --out, or any folder of runs.")],
    format: Annotated[str, typer.Option("--format", help="Table format.")] = "md",
    rows: Annotated[str, typer.Option("--rows", metavar="<method|dataset|shots>[,...]",
                                      help="What the table's rows are; method options after it split them, one row per "
                                           "value (method,cavpt.variant).")] = "method",
    cols: Annotated[str, typer.Option("--cols", help="What the table's columns are.")] = "dataset",
    compare: Annotated[Optional[str], typer.Option("--compare", help="A reference: another folder of runs, or a CSV (e.g. a paper table typed in).")] = None,
    ci: Annotated[Optional[float], typer.Option("--ci", metavar="LEVEL", help="Make the ± the LEVEL% confidence interval of the mean over seeds (Student's t), e.g. 95, instead of the population std.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="What each cell averages: acc (test accuracy) or per-class-acc (the mean of the per-class accuracies, Dassl's per-class result).")] = "acc",
    table: Annotated[Optional[str], typer.Option("--table", help="FOLDER is a `fastprompt reproduce TABLE --out FOLDER`: print it as that paper table (its row labels and headers, the printed numbers beside ours).")] = None,
) -> None:
    """Mean ± population std (n) over seeds per cell, with the Average column; base/new/H; cross-dataset. One
    folder is one recipe: its runs may differ only in the seed, in what their method, dataset, shots and classes
    set, and in the method options --rows names."""
    if table is not None:
        from fastprompt.reproduce import load_table, make_plan, render

        if (rows, cols, compare, ci, metric) != ("method", "dataset", None, None, "acc"):
            raise FastpromptError("--table prints the paper's layout: drop --rows, --cols, --compare, --ci and --metric")
        typer.echo(render(make_plan(load_table(table), folder, report_only=True), format), nl=False)
        return
    from fastprompt.sweep.report import report

    typer.echo(report(folder, format, rows=rows, cols=cols, compare=compare, ci=ci, metric=metric), nl=False)


# ----------------------------------------------------------------------------------------
# reproduce: a published table, from CoOp's dataset folders to the paper's numbers (fastprompt/reproduce)
# ----------------------------------------------------------------------------------------


class ReproduceCommand(Command):
    """`fastprompt reproduce`: also one flag per sweep setting, made from `SweepConfig`'s fields
    (`fastprompt.reproduce.plan.sweep_fields`: --jobs, --launcher, ...), handed to every row's sweep."""

    def extra_flags(self) -> list[inspect.Parameter]:
        from fastprompt.reproduce.plan import sweep_fields

        flags = super().extra_flags()
        for name, kind in sweep_fields().items():
            args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
            base = args[0] if len(args) == 1 else kind
            base = base if base in (int, float, str, bool) else str
            decl = "--" + name.replace("_", "-")
            decls = (f"{decl}/--no-{name.replace('_', '-')}",) if base is bool else (decl,)
            flags.append(_flag(f"sweep__{name}", Optional[base], *decls, panel="Sweep settings",
                               help=f"As `fastprompt sweep {decl}`; every row's sweep."))
        return flags


@command(app, "reproduce", cls=ReproduceCommand)
@user_errors
def reproduce_cmd(
    ctx: typer.Context,
    table: Annotated[Optional[str], typer.Argument(help="A shipped table (see --list), or the path of a table .toml file.")] = None,
    data_root: Annotated[Optional[str], typer.Option("--data-root", help="$DATA: the folder holding CoOp's dataset folders (eurosat/, caltech-101/, ...); each missing .beton is prepared from it into OUT/data.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="The reproduction's folder (default runs/TABLE): data/, rows/ROW/ (a sweep each), report.md/.csv/.tex.")] = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="Comma-separated seeds (default: the table's, 1,2,3).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be prepared, skipped, resumed and started; write nothing.")] = False,
    list_tables: Annotated[bool, typer.Option("--list", help="Print every shipped table: source, grid size (runs, epochs in all) and, with --bench, an estimated time.")] = False,
    bench: Annotated[Optional[str], typer.Option("--bench", help="With --list: a `fastprompt bench --json FILE` of this machine, for the estimated times.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", autocompletion=_complete_device,
                                                  help="As in `fastprompt train`; every run.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="As in `fastprompt train`; every run.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Loader threads per run (default: its share of the cores).")] = None,
) -> None:
    """Reproduce a published table: prepare its datasets, run its grid (a resumable sweep per row), and print and
    write the paper's numbers beside ours."""
    from fastprompt.reproduce import list_lines, load_table, make_plan, plan_lines, render, run_plan

    if list_tables:
        if table is not None:
            raise FastpromptError("--list prints every table; drop TABLE, or drop --list")
        typer.echo("\n".join(list_lines(bench)))
        return
    if bench is not None:
        raise FastpromptError("--bench goes with --list (the estimated times); drop it")
    if table is None:
        raise FastpromptError("give a TABLE, e.g. `fastprompt reproduce cavpt-table1 --data-root $DATA`; --list prints them")
    paper = load_table(table)
    seed_list = None if seeds is None else _int_list("seeds", seeds)
    sweep = {name.removeprefix("sweep__"): v for name, v in ctx.meta["flags"].items() if name.startswith("sweep__")}
    plan = make_plan(paper, out or f"runs/{paper.name}", data_root, seed_list,
                     run={"device": device, "precision": precision, "num_workers": workers}, sweep=sweep)
    if dry_run:
        typer.echo("\n".join(plan_lines(plan)))
        return
    try:
        outcome = run_plan(plan, console=_console(), say=lambda line: typer.echo(line, err=True))
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        raise typer.Exit(code=130) from None
    typer.echo(render(plan, "md"), nl=False)
    typer.echo(f"{outcome.done} done, {outcome.skipped} skipped, {len(outcome.failed)} failed; "
               f"written: {', '.join(str(p) for p in outcome.reports)}")
    for name, error in outcome.failed.items():
        typer.echo(f"failed: {name}: {error}", err=True)
    if not outcome.ok:
        raise typer.Exit(code=1)


plot_app = typer.Typer(cls=Group, help="Figures of a finished run or a sweep (PNG, or PDF with --format pdf), written to RUN/figures by default.",
                       no_args_is_help=True)
app.add_typer(plot_app, name="plot")


@command(plot_app, "shots", cls=BaseCommand, choices=lambda: _figure_choices())
@user_errors
def plot_shots_cmd(
    sweep: Annotated[str, typer.Argument(help="A sweep's --out (or any folder of runs with several shots).")],
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default: SWEEP/figures).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Figure file format.")] = "png",
) -> None:
    """Accuracy against shots per method with the seed spread, one figure per dataset (CoOp Figure 3 style); zero-shot
    CLIP at 0 shots from the `fastprompt zeroshot` JSON saved under SWEEP as zeroshot*.json."""
    from fastprompt.sweep.plot import plot_shots

    for path in plot_shots(sweep, out, fmt):
        typer.echo(str(path))


# ----------------------------------------------------------------------------------------
# plot / interpret / compare: figures and readings of finished runs (fastprompt/viz)
# ----------------------------------------------------------------------------------------


Run = Annotated[str, typer.Argument(help="The --out directory of a finished `fastprompt train`.")]
FigureOut = Annotated[Optional[str], typer.Option("--out", help="Folder for the figure (default RUN/figures).")]
FigureFormat = Annotated[str, typer.Option("--format", help="Figure file format.")]
PlotDevice = Annotated[str, typer.Option("--device", metavar="<auto|cpu|cuda|cuda:N>", autocompletion=_complete_device,
                                         help="Where to run the model (auto: cuda when available).")]


def _figure_choices() -> dict[str, tuple]:
    from fastprompt.viz.figures import FORMATS

    return {"fmt": FORMATS}


@command(plot_app, "attention", cls=BaseCommand, choices=_figure_choices)
@user_errors
def plot_attention_cmd(run: Run, images: Annotated[int, typer.Option("--images", help="Test images (rows), spread over the classes.")] = 8,
                       out: FigureOut = None, fmt: FigureFormat = "png", device: PlotDevice = "cpu",
                       workers: Workers = None) -> None:
    """Last-layer class-token attention over patches: zero-shot CLIP vs the run, with both predictions."""
    from fastprompt.viz.attention import plot_attention

    typer.echo(plot_attention(run, images=images, out=out, fmt=fmt, device=device, num_workers=workers))


@command(plot_app, "tsne", cls=BaseCommand, choices=_figure_choices)
@user_errors
def plot_tsne_cmd(run: Run, max_images: Annotated[int, typer.Option("--max-images", help="Test images embedded, spread over the classes.")] = 1000,
                  out: FigureOut = None, fmt: FigureFormat = "png", device: PlotDevice = "cpu",
                  workers: Workers = None) -> None:
    """t-SNE of test image features, zero-shot CLIP vs the run, coloured by class."""
    from fastprompt.viz.tsne import plot_tsne

    typer.echo(plot_tsne(run, max_images=max_images, out=out, fmt=fmt, device=device, num_workers=workers))


@command(plot_app, "curves", cls=BaseCommand, choices=_figure_choices)
@user_errors
def plot_curves_cmd(run_or_sweep: Annotated[str, typer.Argument(help="A run directory, or a folder of runs (a sweep).")],
                    out: Annotated[Optional[str], typer.Option("--out", help="Folder for the figure (default RUN_OR_SWEEP/figures).")] = None,
                    fmt: FigureFormat = "png") -> None:
    """Training curves from metrics.jsonl: loss, accuracy, learning rate per parameter group."""
    from fastprompt.viz.curves import plot_curves

    typer.echo(plot_curves(run_or_sweep, out=out, fmt=fmt))


@command(plot_app, "confusion", cls=BaseCommand, choices=_figure_choices)
@user_errors
def plot_confusion_cmd(run: Run, out: FigureOut = None, fmt: FigureFormat = "png") -> None:
    """The confusion matrix of the run's reported model on its test split (rows: true class), from results.json."""
    from fastprompt.viz.confusion import plot_confusion

    typer.echo(plot_confusion(run, out=out, fmt=fmt))


@command(app, "interpret", cls=BaseCommand)
@user_errors
def interpret_cmd(run: Run, topk: Annotated[int, typer.Option("--topk", help="Nearest tokens per context vector.")] = 5) -> None:
    """CoOp's reading of learned context vectors: the nearest tokens of the embedding table, with distances."""
    from rich.console import Console

    from fastprompt.viz.interpret import interpret_run, words_table

    Console().print(words_table(interpret_run(run, topk=topk), title=f"nearest tokens of {run}'s context vectors"))


@command(app, "compare", cls=BaseCommand)
@user_errors
def compare_cmd(runs: Annotated[list[str], typer.Argument(help="Run directories of finished `fastprompt train` runs.")],
                device: PlotDevice = "cpu", workers: Workers = None,
                json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the rows (a JSON list) to this file.")] = None) -> None:
    """Zero-shot vs trained test accuracy per run: zero-shot %, trained %, gain, train time, first epoch, steady
    images/s (base / new / H for base-to-new runs); each row is the method and what sets the run apart
    (cavpt (variant=released))."""
    from rich.console import Console

    from fastprompt.files import write_json
    from fastprompt.viz.compare import compare_runs, comparison_tables

    rows = compare_runs(runs, device=device, num_workers=workers)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 100 if all(r.classes != "base" for r in rows) else 160)
    for table in comparison_tables(rows):
        console.print(table)
    if json_out:
        write_json(json_out, [r.to_dict() for r in rows])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
