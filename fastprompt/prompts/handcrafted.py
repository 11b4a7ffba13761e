"""Hand-crafted text features: templates filled with class names, through the frozen text tower.

Computed once per (model, weights, class names, templates) and cached in memory and on
disk (`$FASTPROMPT_CACHE`, default `~/.cache/fastprompt`), as safetensors files written
atomically. Features are normalised per template, averaged over templates and normalised
again (CLIP's prompt ensembling); a single template reduces to its normalised features.
`normalise_each=False` averages the templates' features as the text tower gives them and
normalises the mean (PromptSRC's frozen text target, `fixed_embeddings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from fastprompt.files import atomic_write, cache_dir
from fastprompt.models.clip import ClipBundle
from fastprompt.models.text import encode_tokens, normalize, tokenize

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when the way features are computed changes
_memory: dict[str, torch.Tensor] = {}


def cache_key(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str],
              normalise_each: bool = True) -> str:
    what = {"format": _FORMAT, "model": bundle.name, "weights": bundle.weights_id,
            "classnames": list(classnames), "templates": list(templates)}
    if not normalise_each:  # only then: the keys of CLIP's ensembling stay those of earlier caches
        what["normalise_each"] = False
    payload = json.dumps(what, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def compute_features(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str], batch: int = 256,
                     normalise_each: bool = True) -> torch.Tensor:
    """Normalised ensemble features [K, D] (fp32) on the model's device, without any cache;
    `normalise_each=False`: the mean of the templates' unnormalised features, normalised."""
    model = bundle.model
    texts = [template.format(c) for template in templates for c in classnames]  # template-major: T·K texts
    feats = []
    for start in range(0, len(texts), batch):  # rows of several templates share a pass (PromptSRC's 60)
        tokens = tokenize(model, bundle.tokenizer, texts[start : start + batch])  # (k, 77)
        f = encode_tokens(model, tokens).float()  # (k, D)
        feats.append(normalize(f) if normalise_each else f)
    per_template = torch.cat(feats).view(len(templates), len(classnames), -1)  # (T, K, D)
    mean = per_template[0]
    for f in per_template[1:]:  # summed in template order
        mean = mean + f
    return normalize(mean / len(templates))  # (K, D)


def template_features(bundle: ClipBundle, classnames: Sequence[str], templates: Sequence[str],
                      normalise_each: bool = True) -> torch.Tensor:
    """Cached `compute_features`: memory first, then disk, else compute and store both."""
    key = cache_key(bundle, classnames, templates, normalise_each)
    device = bundle.model.token_embedding.weight.device
    if key in _memory:
        return _memory[key].to(device)
    path = cache_dir() / f"text-{key}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))["features"]
            _memory[key] = feats
            log.debug("hand-crafted features from %s", path)
            return feats.to(device)
        except Exception as err:  # a damaged cache file is recomputed, and said so
            log.warning("ignoring unreadable feature cache %s (%s); recomputing", path, err)
    feats = compute_features(bundle, classnames, templates, normalise_each=normalise_each).cpu()  # (K, D)
    _memory[key] = feats
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"features": feats.contiguous()}, tmp))
    except OSError as err:
        log.warning("could not write feature cache %s (%s); features stay in memory only", path, err)
    return feats.to(device)
