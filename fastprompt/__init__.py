"""fastprompt: a fast, exact training engine for prompt tuning of CLIP-like models.

    import fastprompt
    fastprompt.list_methods()
    model = fastprompt.create_model("vpt-deep", classnames=[...], clip="ViT-B-32", pretrained="openai")
    model, train_transform, eval_transform = fastprompt.create_model_and_transforms("coop", classnames=[...])
    logits = model(eval_transform(PIL.Image.open(path))[None])  # as open_clip: PIL image in, (3, S, S) out
    logits = model(images); loss = model.loss(images, labels)
    model = fastprompt.load_run("runs/my-run")   # a trained run, rebuilt from its directory alone

The heavy imports (torch, open_clip, triton) happen on first use of `create_model` /
`create_model_and_transforms` / `load_run`, so `fastprompt --version` and `--help` answer at once.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastprompt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from fastprompt.errors import FastpromptError  # noqa: E402

__all__ = ["FastpromptError", "__version__", "create_model", "create_model_and_transforms", "list_methods", "load_run"]
_SUBMODULES = ("data", "methods", "models")  # reached as attributes, imported on first use


def __getattr__(name):
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"fastprompt.{name}")
    if name in ("create_model", "create_model_and_transforms", "list_methods"):
        from fastprompt import methods

        return getattr(methods, name)
    if name == "load_run":
        from fastprompt.training.evaluate import load_run

        return load_run
    raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")


def __dir__():
    """The public API (`__all__`, the lazily resolved names included), the submodules reached as
    attributes and the module's dunders; not the helpers this file imports."""
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__) | set(_SUBMODULES))
