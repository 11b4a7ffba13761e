"""Frozen CLIP towers and the ways prompts enter them."""

from fastprompt.models.clip import ClipBundle, load_clip

__all__ = ["ClipBundle", "load_clip"]
