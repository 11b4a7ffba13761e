"""`fastprompt interpret`: CoOp's nearest-word reading of learned context vectors.

Matches KaiyangZhou/CoOp `interpret_prompt.py`: the Euclidean distance (`torch.cdist`)
between each context vector and every row of CLIP's token-embedding table, the `topk`
smallest per context position, and each token shown as the tokenizer's BPE string
(`SimpleTokenizer.decoder`, so a word end reads `photo</w>`). CoOp stops at class-specific
context; here it is read the same way per class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastprompt.errors import FastpromptError
from fastprompt.viz.runs import load_run


@dataclass(frozen=True)
class NearestWords:
    """The nearest tokens of one context vector."""

    position: int  # 1-based context position, as CoOp prints it
    classname: Optional[str]  # class of class-specific context; None for shared context
    tokens: tuple[str, ...]  # nearest first
    distances: tuple[float, ...]  # Euclidean, to the token embeddings


def nearest_words(context: torch.Tensor, token_embedding: torch.Tensor, decoder: dict, topk: int,
                  classname: Optional[str] = None) -> list[NearestWords]:
    """Nearest tokens of each row of context [M, width] in token_embedding [V, width]."""
    distance = torch.cdist(context.float(), token_embedding.float())  # (M, V)
    values, idxs = distance.topk(topk, dim=1, largest=False)  # (M, topk) each, nearest first
    return [NearestWords(m + 1, classname, tuple(decoder[int(i)] for i in row_idx), tuple(float(v) for v in row_val))
            for m, (row_idx, row_val) in enumerate(zip(idxs, values))]


def interpret_run(run_dir: str, *, topk: int = 5) -> list[NearestWords]:
    """CoOp's reading of a run's learned text context (coop, vlp, e2mim, cavpt with text prompts)."""
    if topk < 1:
        raise FastpromptError(f"--topk {topk} must be at least 1")
    run = load_run(run_dir, device="cpu")
    text = run.model.text
    if text is None:
        raise FastpromptError(
            f"{run.method} learns no text context; interpret reads CoOp context vectors (coop, vlp, e2mim, cavpt --cavpt.text-prompt)"
        )
    embedding = run.model.clip.token_embedding.weight.detach()  # (V, width)
    decoder = run.model.bundle.tokenizer.decoder
    context = text.context.detach()  # (M, width) or (K, M, width)
    if context.dim() == 2:
        return nearest_words(context, embedding, decoder, topk)
    return [row for k, name in enumerate(run.model.classnames)
            for row in nearest_words(context[k], embedding, decoder, topk, classname=name)]


def words_table(rows: list[NearestWords], title: str = ""):
    """A rich Table: position (and class), then `token (distance)` nearest first."""
    from rich.table import Table

    table = Table(title=title or None)
    per_class = any(r.classname is not None for r in rows)
    if per_class:
        table.add_column("class")
    table.add_column("ctx", justify="right")
    width = max(len(r.tokens) for r in rows)
    for j in range(width):
        table.add_column(f"nearest {j + 1}")
    for r in rows:
        cells = [f"{t} ({d:.4f})" for t, d in zip(r.tokens, r.distances)]
        table.add_row(*([r.classname] if per_class else []), str(r.position), *cells)
    return table
