"""fastprompt: a fast, exact training engine for prompt tuning of CLIP-like models.

    import fastprompt
    fastprompt.list_methods()
    model = fastprompt.create_model("vpt-deep", classnames=[...], clip="ViT-B-32", pretrained="openai")
    logits = model(images); loss = model.loss(images, labels)
    model = fastprompt.load_run("runs/my-run")   # a trained run, rebuilt from its directory alone

The heavy imports (torch, open_clip, triton) happen on first use of `create_model` /
`list_methods`, so `fastprompt --version` and `--help` answer at once.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastprompt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from fastprompt.errors import FastpromptError  # noqa: E402

__all__ = ["FastpromptError", "create_model", "list_methods", "load_run", "__version__"]


def __getattr__(name):
    if name in ("create_model", "list_methods", "methods", "models"):
        import importlib

        if name in ("methods", "models"):
            return importlib.import_module(f"fastprompt.{name}")
        from fastprompt import methods

        return getattr(methods, name)
    if name == "load_run":
        from fastprompt.training.evaluate import load_run

        return load_run
    raise AttributeError(f"module 'fastprompt' has no attribute {name!r}")
