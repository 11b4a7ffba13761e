"""The frozen CLIP text tower run on token *embeddings*, so learnable context can enter it.

CLIP's text transformer is causal and pools at the EOT token, so the tokens after the
longest EOT of a batch never influence any feature. `backend="fast"` runs the tower on
sequences cut to `max_eot + 1` positions instead of the full 77; `backend="reference"`
runs the full context length with CLIP's own mask, exactly as `encode_text` does. Both give
the same features (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import CLIP

BACKENDS = ("fast", "reference")


def tokenize(clip: CLIP, tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [K, context_length] on the model's device; EOT is the largest id of each row."""
    tokens = tokenizer(texts)  # (K, 77)
    return tokens.to(clip.token_embedding.weight.device)


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the EOT token of each row (OpenAI BPE: the largest id)."""
    return tokens.argmax(dim=-1)  # (K,)


def encode_embeddings(clip: CLIP, x: torch.Tensor, eot: torch.Tensor, backend: str = "fast") -> torch.Tensor:
    """Text features [K, D] (not normalised) of prompt embeddings x [K, L, width] pooled at `eot` [K].

    `x` holds token embeddings *without* positional embeddings; L is CLIP's context length.
    """
    if backend == "fast":
        length = int(eot.max()) + 1  # CPU-GPU sync: one scalar per text encode
        x = x[:, :length]  # (K, length, width)
    else:
        length = x.shape[1]
    x = x + clip.positional_embedding[:length].to(x.dtype)  # (K, L, width)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])  # (K, L, width)
    x = clip.ln_final(x)  # (K, L, width)
    x = x[torch.arange(x.shape[0], device=x.device), eot]  # (K, width)
    if isinstance(clip.text_projection, torch.nn.Linear):
        return clip.text_projection(x)  # (K, D)
    return x @ clip.text_projection  # (K, D)


def encode_tokens(clip: CLIP, tokens: torch.Tensor, backend: str = "fast") -> torch.Tensor:
    """Features [K, D] of token ids [K, 77]; equals `clip.encode_text(tokens)`."""
    x = clip.token_embedding(tokens)  # (K, 77, width)
    return encode_embeddings(clip, x, eot_positions(tokens), backend)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
