"""fastprompt: a fast, exact training engine for prompt tuning of CLIP-like models.

    import fastprompt
    fastprompt.list_methods()
    model = fastprompt.create_model("vpt-deep", classnames=[...], clip="ViT-B-32", pretrained="openai")
    logits = model(images); loss = model.loss(images, labels)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastprompt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from fastprompt.errors import FastpromptError  # noqa: E402
from fastprompt.methods import create_model, list_methods  # noqa: E402

__all__ = ["FastpromptError", "create_model", "list_methods", "__version__"]
