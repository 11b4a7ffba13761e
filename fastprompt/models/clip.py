"""Loading a frozen open_clip CLIP: a model name with a pretrained tag, a local checkpoint
file, random weights, or a CLIP instance the caller built.

Accepted: an `open_clip.CLIP` whose text tower pools at the EOT token (`argmax`, OpenAI's
BPE tokenizer) and whose image tower is either a plain `VisionTransformer` (class-token
pooling, no attentional pooler) or any other open_clip image tower (the ResNet CLIPs RN50,
RN101, RN50x4, ... that CoOp's headline numbers use). Methods that leave the image tower
alone (zeroshot, coop, e2mim) run on every accepted tower; methods that prompt it need the
ViT and say so (`require_vit`). Anything else is rejected with a message instead of being
run wrongly.

`fastprompt-tiny` is a small config shipped with the package (64 px input, 3 vision and 2
text layers of width 64) for tests and the demo.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from fastprompt.errors import FastpromptError

log = logging.getLogger(__name__)

TINY = "fastprompt-tiny"
_CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False

# Suffixes that make a `pretrained` string a file path rather than an open_clip tag.
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _register_configs() -> None:
    """Add fastprompt's shipped model configs (fastprompt-tiny) to open_clip's registry once."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


@dataclass
class ClipBundle:
    """A frozen CLIP model plus what the methods need to know about it."""

    model: open_clip.CLIP
    name: str  # open_clip model name, or "custom" for a caller-built instance
    weights_id: str  # identifies the weights for caches: "tag:openai", "file:<sha>", "params:<sha>"
    tokenizer: open_clip.tokenizer.SimpleTokenizer

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def is_vit(self) -> bool:
        """True for a ViT image tower (visual prompts apply); False for a ResNet CLIP."""
        return isinstance(self.model.visual, VisionTransformer)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.class_embedding.shape[-1])

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[-1])

    @property
    def vision_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own temperature τ = exp(logit_scale) as a 0-d tensor (frozen)."""
        return self.model.logit_scale.exp()


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES) or os.path.exists(pretrained)


def _file_fingerprint(path: str) -> str:
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _params_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the text-tower weights (all that hand-crafted features depend on) plus the model shape."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        if name.startswith("visual."):
            h.update(f"{name}{tuple(sd[name].shape)}".encode())
            continue
        t = sd[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def check_supported(model: torch.nn.Module) -> None:
    """Reject CLIP variants the prompt methods are not written for, naming what differs."""
    if not isinstance(model, open_clip.CLIP):
        raise FastpromptError(
            f"clip instance is a {type(model).__name__}; fastprompt needs an open_clip.CLIP "
            "(OpenAI-style text tower), e.g. open_clip.create_model('ViT-B-32')"
        )
    visual = model.visual
    blocks = list(model.transformer.resblocks)
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise FastpromptError(
                "the ViT pools its output with something other than the class token; pick a plain CLIP ViT such as ViT-B-32 or ViT-B-16"
            )
        blocks += list(visual.transformer.resblocks)
    if model.text_pool_type != "argmax":
        raise FastpromptError(
            f"the text tower pools with '{model.text_pool_type}', not at the EOT token; pick an OpenAI-style CLIP such as ViT-B-32"
        )
    for block in blocks:
        if type(block) is not ResidualAttentionBlock:
            raise FastpromptError(
                f"transformer block type {type(block).__name__} is not supported; pick a plain CLIP ViT such as ViT-B-32"
            )


def require_vit(bundle: "ClipBundle", method: str) -> None:
    """Methods that prompt the image tower need a ViT (its token sequence holds the prompts)."""
    if not bundle.is_vit:
        raise FastpromptError(
            f"{method} prompts the image tower and the image tower of {bundle.name} is a {type(bundle.model.visual).__name__}; "
            "visual prompts need a ViT: pick a ViT model such as ViT-B-32 or ViT-B-16 (zeroshot, coop and e2mim run on any tower)"
        )


class _QuietRandomInit(logging.Filter):
    """open_clip warns on the root logger when a model is built without weights; when the
    caller asked for random weights that is no news, so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _create_random(clip: str, device) -> torch.nn.Module:
    quiet = _QuietRandomInit()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(clip, pretrained=None, device=device)
    finally:
        root.removeFilter(quiet)


def _freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _checkpoint_kind(path: str) -> Optional[str]:
    """'safetensors', 'torch' (a torch.save zip or legacy pickle) or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31):
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip (torch.save since 1.6) or pickle protocol 2+
        return "torch"
    return None


def _create_from_file(clip: str, path: str, device, trust_pickle: bool) -> torch.nn.Module:
    """open_clip's loader on a local checkpoint, never unpickling arbitrary objects unless the
    caller trusts the file: torch.load(weights_only=True) reads tensors and plain containers
    only, so a checkpoint whose pickle would run code is refused before anything runs."""
    if not os.path.isfile(path):
        raise FastpromptError(
            f"checkpoint file not found: {path}; pass an existing checkpoint file, an open_clip tag such as 'openai', or None for random weights"
        )
    if _checkpoint_kind(path) is None:
        raise FastpromptError(
            f"{path} is not a checkpoint (neither safetensors nor a torch.save file); pass a checkpoint saved from {clip}, "
            "an open_clip tag such as 'openai', or none for random weights"
        )
    try:
        return open_clip.create_model(clip, pretrained=path, device=device, weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise FastpromptError(
                f"checkpoint {path} stores Python objects besides tensors, and unpickling them can run code; "
                "convert it to safetensors, or pass --trust-pickle if you trust where it came from"
            ) from None
        raise FastpromptError(f"checkpoint {path} is unreadable ({_first_line(err)}); pass a checkpoint saved from {clip}") from None
    except (RuntimeError, KeyError, ValueError, AssertionError, EOFError, OSError, AttributeError, TypeError) as err:
        raise FastpromptError(
            f"checkpoint {path} does not fit model {clip} ({_first_line(err)}); pass a checkpoint saved from {clip}"
        ) from None


# How long the host a pretrained tag downloads from (or the proxy to it) may take to accept a TCP
# connection before the tag counts as offline. Without it, huggingface_hub retries each file five
# times with backoff (1+2+4+8+8 s) and open_clip asks for two files: ~50 s before a machine
# without internet hears that it has none.
PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class _Download:
    """Where open_clip downloads a pretrained tag from, and where it caches it."""

    url: str  # the Hugging Face repository's page, or the file's URL
    cache: str  # the folder open_clip looks in first
    hub: bool  # via huggingface_hub (its offline mode applies)


def _download_of(clip: str, tag: str) -> Optional[_Download]:
    """Where `tag` comes from, as open_clip's `download_pretrained` chooses: the Hugging Face hub
    when the tag has a hub id and huggingface_hub is installed, else its URL; None for a tag that
    names a local file."""
    from open_clip import pretrained as oc_pretrained

    cfg = open_clip.get_pretrained_cfg(clip, tag)
    if not cfg or cfg.get("file"):
        return None
    if cfg.get("hf_hub") and oc_pretrained.has_hf_hub():
        from huggingface_hub import constants

        return _Download(f"{constants.ENDPOINT}/{cfg['hf_hub'].split('/')[0]}/{cfg['hf_hub'].split('/')[1]}",
                         constants.HF_HUB_CACHE, hub=True)
    if cfg.get("url"):
        return _Download(cfg["url"], os.path.expanduser("~/.cache/clip"), hub=False)
    return None


def _unreachable(url: str) -> Optional[str]:
    """Why `url`'s host (or the proxy the environment names for it) does not accept a TCP
    connection within PROBE_SECONDS; None when it does."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    via = bool(proxy) and not urllib.request.proxy_bypass(parts.hostname or "")
    target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}") if via else parts
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    name = f"the proxy {host}:{port}" if via else host
    failed: list[str] = []

    def connect() -> None:  # in a thread: a name lookup that hangs is cut at PROBE_SECONDS too
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        except OSError as err:
            failed.append(err.strerror or type(err).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(PROBE_SECONDS)
    if probe.is_alive():
        return f"{name} did not answer within {PROBE_SECONDS:g} s"
    return f"{name} is unreachable ({failed[0]})" if failed else None


@contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline mode for one call when `offline`: a cached file loads, nothing
    is fetched. huggingface_hub reads HF_HUB_OFFLINE once, at import, into
    `constants.HF_HUB_OFFLINE`, which its `is_offline_mode()` returns on every request: setting
    that is what the variable does when set before the import."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _create_from_tag(clip: str, tag: str, device) -> torch.nn.Module:
    """open_clip's download (or its local cache) of a pretrained tag. When the host it comes from
    does not accept a connection within PROBE_SECONDS, the tag loads from the local cache only
    (huggingface_hub's offline mode) and, if it is not there, fails at once with one line that
    says what to do; a reachable host gets open_clip's download untouched."""
    download = _download_of(clip, tag)
    offline = None
    if download is not None and download.hub:
        from huggingface_hub import constants

        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(download.url)
    elif download is not None:
        offline = _unreachable(download.url)
    quiet = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("urllib3")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # open_clip logs the failure at ERROR before raising it; we say it once
        logger.setLevel(logging.CRITICAL)
    try:
        with _hub_offline(offline is not None and download.hub):
            return open_clip.create_model(clip, pretrained=tag, device=device)
    except (RuntimeError, OSError) as err:
        if offline is not None and "Failed to download" in str(err):  # open_clip's words for a failed download
            raise FastpromptError(
                f"could not download the pretrained weights '{tag}' of {clip}: {offline}, and they are not in the local "
                f"cache {download.cache}; download them where there is internet ({download.url}) and pass "
                f"--pretrained FILE, or copy that machine's cache folder to {download.cache}"
            ) from None
        raise FastpromptError(
            f"could not load the pretrained weights '{tag}' of {clip} ({_first_line(err)}); check the connection, or "
            "download them elsewhere and pass --pretrained FILE"
        ) from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def load_clip(
    clip: Union[str, torch.nn.Module] = "ViT-B-32",
    pretrained: Optional[str] = "openai",
    device: Union[str, torch.device] = "cpu",
    trust_pickle: bool = False,
) -> ClipBundle:
    """Build a frozen CLIP.

    `clip` is an open_clip model name (`open_clip.list_models()` plus `fastprompt-tiny`)
    or a CLIP instance. `pretrained` is an open_clip tag (e.g. "openai", downloaded by
    open_clip into its cache), a local checkpoint file, or None / "none" for random init.
    A checkpoint file is read without unpickling arbitrary objects (safetensors, or
    torch.load with weights_only=True); `trust_pickle=True` allows a full unpickle.
    """
    _register_configs()
    tokenizer_cls = open_clip.tokenizer.SimpleTokenizer
    if isinstance(clip, torch.nn.Module):
        check_supported(clip)
        _freeze(clip)
        clip = clip.to(device)
        tokenizer = tokenizer_cls(context_length=clip.context_length)
        return ClipBundle(clip, "custom", f"params:{_params_fingerprint(clip)}", tokenizer)

    if not isinstance(clip, str) or not clip:
        raise FastpromptError(f"clip={clip!r} must be an open_clip model name or an open_clip.CLIP instance")
    known = open_clip.list_models()
    if clip not in known:
        close = get_close_matches(clip, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FastpromptError(
            f"unknown CLIP model '{clip}'{hint}; use a name from open_clip.list_models(), e.g. ViT-B-32, ViT-B-16 or {TINY}"
        )

    if pretrained is None or (isinstance(pretrained, str) and pretrained.lower() == "none"):
        model = _create_random(clip, device)
        check_supported(model)
        _freeze(model)
        weights_id = f"params:{_params_fingerprint(model)}"
    elif _looks_like_path(pretrained):
        model = _create_from_file(clip, pretrained, device, trust_pickle)
        weights_id = f"file:{_file_fingerprint(pretrained)}"
    else:
        tags = open_clip.list_pretrained_tags_by_model(clip)
        if pretrained not in tags:
            raise FastpromptError(
                f"unknown pretrained tag '{pretrained}' for {clip}; valid tags: {', '.join(tags) or 'none (use a local checkpoint file or None)'}"
            )
        model = _create_from_tag(clip, pretrained, device)
        weights_id = f"tag:{pretrained}"

    check_supported(model)
    _freeze(model)
    return ClipBundle(model, clip, weights_id, tokenizer_cls(context_length=model.context_length))
