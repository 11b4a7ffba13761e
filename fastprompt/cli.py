"""The `fastprompt` command line: parses arguments and delegates to library functions.

Every command turns `FastpromptError` into a one-line message and exit code 2; nothing
else is caught here.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Optional

import typer

import fastprompt
from fastprompt.errors import FastpromptError

app = typer.Typer(
    name="fastprompt",
    help="Fast, exact prompt tuning for CLIP: zero-shot, CoOp, VPT, VLP, CAVPT, E2MIM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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


@app.command("methods")
def methods_cmd() -> None:
    """List the prompt-tuning methods this engine implements."""
    for name in fastprompt.list_methods():
        typer.echo(name)


# ----------------------------------------------------------------------------------------
# prepare: datasets -> .beton (data layer, fastprompt/data)
# ----------------------------------------------------------------------------------------

prepare_app = typer.Typer(
    help="Write a dataset as an FFCV .beton with its .json sidecar (class names, template, splits), or the demo CLIP.",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare")


@prepare_app.command("imagefolder")
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
) -> None:
    """Write a folder of images (with a CoOp split file, split folders, or a stratified split) as a .beton."""
    from fastprompt.data import write_imagefolder

    summary = write_imagefolder(
        root, out, split_json=split_json, name=name, classnames_file=classnames, max_resolution=max_resolution,
        jpeg_quality=jpeg_quality, workers=workers, skip_bad=skip_bad, train_short_side=train_short_side,
        eval_size=eval_size, eval_format=eval_format,
    )
    typer.echo(summary.line())


@prepare_app.command("coop")
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
                         eval_format=eval_format)
    typer.echo(summary.line())


@prepare_app.command("demo")
@user_errors
def prepare_demo_cmd(
    out: Annotated[str, typer.Option("--out", help="Output NAME.beton; the sidecar NAME.json goes beside it.")] = "demo.beton",
    images_per_class: Annotated[int, typer.Option("--images-per-class", help="Images per class, split 50/20/30 into train/val/test.")] = 50,
    size: Annotated[int, typer.Option("--size", help="Side of the square images, px.")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="The set is a function of the seed.")] = 0,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Writer processes (default: the available cores).")] = None,
) -> None:
    """Write the built-in demo set: 10 classes of coloured shapes ("red circle", ...) on random backgrounds."""
    from fastprompt.data import write_demo

    summary = write_demo(out, images_per_class=images_per_class, image_size=size, seed=seed, workers=workers)
    typer.echo(summary.line())


@prepare_app.command("demo-clip")
@user_errors
def prepare_demo_clip_cmd(
    out: Annotated[str, typer.Option("--out", help="Output checkpoint NAME.pt; use it as --clip fastprompt-tiny --pretrained NAME.pt.")] = "demo-clip.pt",
    steps: Annotated[int, typer.Option("--steps", help="Contrastive training steps (about 0.13 s each on 2 CPU cores).")] = 600,
    seed: Annotated[int, typer.Option("--seed", help="Weights, images and sampling are functions of the seed.")] = 0,
) -> None:
    """Pretrain fastprompt-tiny on synthetic colour-shape captions (never the demo's classes): a small CLIP that knows something."""
    from fastprompt.training.pretrain import PretrainConfig, pretrain_clip

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    config = PretrainConfig(steps=steps, seed=seed)
    columns = (TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
               TimeElapsedColumn())
    with Progress(*columns, console=_console()) as progress:
        task = progress.add_task("pretrain", total=steps, loss=float("nan"))
        summary = pretrain_clip(out, config, progress=lambda step, loss: progress.update(task, completed=step, loss=loss))
    typer.echo(summary.line())


# ----------------------------------------------------------------------------------------
# train / eval / zeroshot
# ----------------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    return Console(stderr=True)


# CLI flag -> create_model keyword, for the method options (only the flags given are passed)
METHOD_FLAGS = {
    "coop_n_ctx": "n_ctx", "coop_csc": "csc", "coop_ctx_init": "ctx_init", "vpt_n_prompts": "n_prompts",
    "cavpt_topk": "topk", "cavpt_layers": "layers", "cavpt_alpha": "alpha", "cavpt_aux_target": "aux_target",
    "cavpt_topk_source": "topk_source", "cavpt_text_prompt": "text_prompt", "e2mim_mixup_alpha": "mixup_alpha",
    "e2mim_mi_weight": "mi_weight", "e2mim_infer": "infer", "e2mim_mi_dim": "mi_dim",
}

Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (auto: cuda when available).")]
Precision = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 (auto: bf16 autocast on cuda, fp32 on cpu).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Loader threads (default: the available cores).")]


@app.command("train")
@user_errors
def train_cmd(
    method: Annotated[str, typer.Option("--method", help="zeroshot is evaluated with `fastprompt zeroshot`; train: coop, vpt-shallow, vpt-deep, vlp, cavpt, e2mim.")],
    data: Annotated[str, typer.Option("--data", help="A .beton from `fastprompt prepare` (its .json sidecar beside it).")],
    out: Annotated[Optional[str], typer.Option("--out", help="Run directory (default runs/METHOD-DATA-Sshot-seedN). The same --out resumes.")] = None,
    clip: Annotated[str, typer.Option("--clip", help="open_clip model name, or fastprompt-tiny.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, a checkpoint file, or none (random weights).")] = "openai",
    template: Annotated[Optional[str], typer.Option("--template", help="Hand-crafted template with {} (default: the dataset's); 'ensemble' for CLIP's 7.")] = None,
    shots: Annotated[int, typer.Option("--shots", help="Training images per class (0: all).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Few-shot sample, init, order and augmentation.")] = 1,
    classes: Annotated[str, typer.Option("--classes", help="all | base (base-to-new: also evaluates new classes).")] = "all",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default: 200 for 16 shots, 100 for 4-8, 50 for 1-2.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (the papers') | adamw.")] = "sgd",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine decay after warm-up).")] = 0.002,
    warmup_epochs: Annotated[Optional[int], typer.Option("--warmup-epochs", help="Constant-lr warm-up epochs (default 10 visual / 1 text, at most epochs/10).")] = None,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr")] = 1e-5,
    momentum: Annotated[float, typer.Option("--momentum")] = 0.9,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 5e-4,
    device: Device = "auto",
    precision: Precision = "auto",
    backend: Annotated[str, typer.Option("--backend", help="fast | reference (the eager oracle).")] = "fast",
    compile: Annotated[str, typer.Option("--compile", help="torch.compile the training step: auto (on cuda only) | off | default | reduce-overhead | max-autotune.")] = "auto",
    workers: Workers = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Epochs between checkpoints (0: only at the end).")] = 1,
    feature_cache: Annotated[int, typer.Option("--feature-cache", help="coop/e2mim: cache V augmented views of the frozen image features (0: off).")] = 0,
    coop_n_ctx: Annotated[Optional[int], typer.Option("--coop.n-ctx", help="CoOp context vectors M (default 16).")] = None,
    coop_csc: Annotated[Optional[bool], typer.Option("--coop.csc/--coop.shared", help="Class-specific context.")] = None,
    coop_ctx_init: Annotated[Optional[str], typer.Option("--coop.ctx-init", help="Init phrase, e.g. 'a photo of a'.")] = None,
    vpt_n_prompts: Annotated[Optional[int], typer.Option("--vpt.n-prompts", help="Visual prompts per layer (default 10).")] = None,
    cavpt_topk: Annotated[Optional[int], typer.Option("--cavpt.topk", help="K_N classes per image (default 5).")] = None,
    cavpt_layers: Annotated[Optional[int], typer.Option("--cavpt.layers", help="Last layers with class-aware prompts (default 1).")] = None,
    cavpt_alpha: Annotated[Optional[float], typer.Option("--cavpt.alpha", help="Auxiliary loss weight (default 1.0).")] = None,
    cavpt_aux_target: Annotated[Optional[str], typer.Option("--cavpt.aux-target", help="eq10 | gt-only.")] = None,
    cavpt_topk_source: Annotated[Optional[str], typer.Option("--cavpt.topk-source", help="cached | online.")] = None,
    cavpt_text_prompt: Annotated[Optional[bool], typer.Option("--cavpt.text-prompt", help="Also learn CoOp context (VLP-CLIP-CAVPT).")] = None,
    e2mim_no_mixup: Annotated[bool, typer.Option("--e2mim.no-mixup", help="Switch class-wise mixup off.")] = False,
    e2mim_mixup_alpha: Annotated[Optional[float], typer.Option("--e2mim.mixup-alpha", help="Beta(a, a) of the mixup weight (default 1.0).")] = None,
    e2mim_mi_weight: Annotated[Optional[float], typer.Option("--e2mim.mi-weight", help="InfoNCE weight (default 1.0; 0 = off).")] = None,
    e2mim_infer: Annotated[Optional[str], typer.Option("--e2mim.infer", help="ensemble | soft.")] = None,
    e2mim_mi_dim: Annotated[Optional[int], typer.Option("--e2mim.mi-dim", help="Critic head width (default 128).")] = None,
) -> None:
    """Train prompts on a .beton and evaluate them on its test split."""
    from pathlib import Path

    from fastprompt.training import TrainConfig, train

    given = locals()
    options = {key: given[flag] for flag, key in METHOD_FLAGS.items() if given[flag] is not None}
    if e2mim_no_mixup:
        options["mixup"] = False
    if out is None:
        out = str(Path("runs") / f"{method}-{Path(data).stem}-{shots}shot-seed{seed}")
    config = TrainConfig(
        method=method, data=data, out=out, clip=clip, pretrained=pretrained, template=template,
        shots=shots or None, seed=seed, classes=classes, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
        warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, momentum=momentum, weight_decay=weight_decay,
        device=device, precision=precision, backend=backend, compile=compile, num_workers=workers,
        checkpoint_every=checkpoint_every, feature_cache=feature_cache, options=options,
    )
    results = train(config, console=_console())
    typer.echo(json.dumps(results))


@app.command("eval")
@user_errors
def eval_cmd(
    run: Annotated[str, typer.Argument(help="The --out directory of a finished `fastprompt train`.")],
    data: Annotated[str, typer.Option("--data", help="The .beton to evaluate on (any dataset).")],
    classes: Annotated[str, typer.Option("--classes", help="all | base | new.")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
) -> None:
    """Evaluate a run's prompts on the test split of a dataset (cross-dataset, base-to-new, domains)."""
    from fastprompt.training import evaluate_run

    result = evaluate_run(run, data, classes, device=device, precision=precision, batch_size=batch_size,
                          num_workers=workers)
    typer.echo(json.dumps(result))


@app.command("zeroshot")
@user_errors
def zeroshot_cmd(
    data: Annotated[str, typer.Option("--data", help="A .beton from `fastprompt prepare`.")],
    clip: Annotated[str, typer.Option("--clip")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, checkpoint file, or none.")] = "openai",
    template: Annotated[Optional[str], typer.Option("--template", help="Default: the dataset's; 'ensemble' for CLIP's 7.")] = None,
    classes: Annotated[str, typer.Option("--classes", help="all | base | new.")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seeds random weights with --pretrained none.")] = 1,
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
) -> None:
    """Zero-shot CLIP accuracy on the test split of a dataset."""
    from fastprompt.training import zeroshot_eval

    result = zeroshot_eval(data, clip=clip, pretrained=pretrained, template=template, classes=classes, device=device,
                           precision=precision, batch_size=batch_size, num_workers=workers, seed=seed)
    typer.echo(json.dumps(result))


# ----------------------------------------------------------------------------------------
# bench: training-step throughput and peak memory per method and variant (fastprompt/bench/)
# ----------------------------------------------------------------------------------------


def _comma_list(value: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


@app.command("bench")
@user_errors
def bench_cmd(
    clip: Annotated[str, typer.Option("--clip", help="open_clip model name, or fastprompt-tiny.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option("--pretrained", help="open_clip tag, a checkpoint file, or none (random weights; speed does not depend on them).")] = "none",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step.")] = 16,
    classes: Annotated[int, typer.Option("--classes", help="Number of classes to simulate ('class 0' .. 'class N-1').")] = 100,
    device: Device = "auto",
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods (default: all, plus coop-text, the CoOp text step alone).")] = None,
    variants: Annotated[Optional[str], typer.Option("--variants", help="Comma-separated: reference, fast, fast+compile, anchor (default: all).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per variant (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps before them (compilation gets its own).")] = 1,
    compile_mode: Annotated[str, typer.Option("--compile-mode", help="torch.compile mode of fast+compile: default | reduce-overhead | max-autotune.")] = "default",
    seed: Annotated[int, typer.Option("--seed", help="Random weights, prompts, images and labels.")] = 0,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Write the records (a JSON list) to this file.")] = None,
) -> None:
    """Training-step images/s and peak memory: reference vs fast vs fast+compile vs an anchor-style baseline."""
    from rich.console import Console

    from fastprompt.bench import BenchConfig, records_table, run_bench, write_records

    options = {"methods": _comma_list(methods), "variants": _comma_list(variants)}
    config = BenchConfig(clip=clip, pretrained=pretrained, batch_size=batch_size, classes=classes, device=device,
                         steps=steps, warmup=warmup, compile_mode=compile_mode, seed=seed,
                         **{k: v for k, v in options.items() if v is not None})
    with _console().status("bench") as status:
        records = run_bench(config, progress=lambda what: status.update(f"bench: {what}"))
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 132)  # piped or redirected: do not cut the numbers
    console.print(records_table(records))
    if json_out:
        write_records(records, json_out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
