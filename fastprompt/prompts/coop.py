"""CoOp's learnable text context (Zhou et al., "Learning to Prompt for Vision-Language Models").

The prompt of class k is `[SOS, u_1..u_M, CLASS tokens, ".", EOS]`: M learnable context
vectors shared by all classes (or one set per class with `csc=True`) followed by the
embedding of the class name. Initialisation: N(0, 0.02), or the token embeddings of an
init phrase such as "a photo of a" (then M is the phrase's token count).

An init phrase longer than M tokens (MaPLe's, IVLP's and PromptSRC's layout,
muzairkhattak/multimodal-prompt-learning `trainers/independentVL.py` and `maple.py`:
`ctx_vectors = embedding[0, 1 : 1 + n_ctx]`, `prompt_prefix = ctx_init`): its first M tokens
initialise the context and the rest of the phrase stays in every prompt as frozen words, so
2 tokens of "a photo of a" give `[SOS, u_1, u_2, "of", "a", CLASS tokens, ".", EOS]`.

Deep context (`depth` J > 1; MaPLe's IVLP and MaPLe text layers, muzairkhattak/
multimodal-prompt-learning `clip/model.py` `ResidualAttentionBlock_IVLP`): layers 2..J
overwrite the M context positions with their own learnable context `deep_context`
[J-1, M, width], N(0, 0.02) like the released `VPT_shallow` of those blocks, shared by all
classes (`fastprompt.models.text`).

Init in the last slots (`fill="last"`; ProGrad, BeierZhu/Prompt-align `ProGrad.public/trainers/
prograd.py` `PromptLearner.__init__`): the phrase's `w = len(ctx_init.split(" "))` words count, the
M context vectors are zeros but for the last w, which take the phrase's first w token
embeddings; the prompt is the tokenised `"X .. X {ctx_init} {name}."` (M - w X's) from position
1 + M on, so a phrase with more tokens than words ("pet," is two) keeps its last tokens frozen
before the class name, as released.

Class position (CoOp's CLASS_TOKEN_POSITION, KaiyangZhou/CoOp `trainers/coop.py`
`PromptLearner.forward`): "end" `[SOS, u_1..u_M, CLASS, ".", EOS]`; "middle"
`[SOS, u_1..u_{M//2}, CLASS, u_{M//2+1}..u_M, ".", EOS]`; "front" `[SOS, CLASS, u_1..u_M, ".",
EOS]`. The class name's tokens move, the EOS stays where it was: a fixed permutation `order`
[K, 77] of the "end" layout's positions (one gather). No shared prefix beyond SOS then, so the
fast path is the EOS-truncated tower alone.

Conditioned context (CoCoOp, KaiyangZhou/CoOp `trainers/cocoop.py` `PromptLearner.forward`):
`conditioned(clip, shift)` gives the features of every class's prompt with context
`u + shift_b` for each row b of `shift` [B, width] (one vector added to every context token).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fastprompt.errors import FastpromptError
from fastprompt.models.clip import ClipBundle
from fastprompt.models.text import encode_embeddings, encode_prefix_groups, encode_shared_prefix, eot_positions, tokenize

DEFAULT_N_CTX = 16


class CoopContext(nn.Module):
    """Learnable context `context` [M, width] (or [K, M, width] class-specific) and the
    frozen SOS / class-name / EOS embeddings around it."""

    def __init__(
        self,
        bundle: ClipBundle,
        classnames: Sequence[str],
        n_ctx: Optional[int] = None,
        csc: bool = False,
        ctx_init: Optional[str] = None,
        init_std: float = 0.02,
        depth: Optional[int] = 1,
        class_position: str = "end",
        fill: str = "first",
    ):
        super().__init__()
        clip, tokenizer = bundle.model, bundle.tokenizer
        n_cls, width = len(classnames), bundle.text_width
        n_layers = len(clip.transformer.resblocks)
        depth = n_layers if depth is None else depth
        if not 1 <= depth <= n_layers:
            raise FastpromptError(f"text_depth={depth} does not fit the text tower's {n_layers} layers; pick 1..{n_layers}")
        if fill not in ("first", "last"):
            raise FastpromptError(f"fill={fill!r} must be 'first' (the phrase is the context) or 'last' (ProGrad's layout)")
        with torch.no_grad():
            if ctx_init and fill == "last":
                return self._init_last(bundle, classnames, n_ctx, ctx_init, depth, class_position)
            if ctx_init:
                phrase = tokenize(clip, tokenizer, [ctx_init])  # (1, 77)
                n_phrase = int(eot_positions(phrase)[0]) - 1  # tokens between SOS and EOT
                if n_ctx is not None and n_ctx > n_phrase:
                    raise FastpromptError(
                        f"n_ctx={n_ctx} is more than the {n_phrase} tokens of ctx_init={ctx_init!r}; drop n_ctx, pick "
                        f"n_ctx <= {n_phrase} (its first n_ctx tokens are learned, the rest stay in the prompt) or a longer phrase"
                    )
                n_ctx = n_phrase if n_ctx is None else n_ctx
                init = clip.token_embedding(phrase)[0, 1 : 1 + n_ctx].float()  # (M, width)
                context = init.expand(n_cls, -1, -1).clone() if csc else init.clone()
            else:
                n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
                shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
                context = torch.empty(shape, device=clip.token_embedding.weight.device).normal_(0.0, init_std)
            n_words = n_phrase - n_ctx if ctx_init else 0  # words of the phrase after the context, kept in the prompt
            if n_words:  # MaPLe's layout: the whole phrase in the prompt, its first n_ctx positions learned
                tokens = tokenize(clip, tokenizer, [f"{ctx_init} {name}." for name in classnames])  # (K, 77)
                words = tokens[:, 1 + n_ctx : 1 + n_phrase]  # (K, n_words)
                if not bool((words == phrase[:, 1 + n_ctx : 1 + n_phrase]).all()):
                    raise FastpromptError(f"ctx_init={ctx_init!r} is tokenised differently before a class name; "
                                          "end it with a whole word")
            else:
                placeholder = " ".join(["X"] * n_ctx)
                tokens = tokenize(clip, tokenizer, [f"{placeholder} {name}." for name in classnames])  # (K, 77)
            embedding = clip.token_embedding(tokens)  # (K, 77, width)

        self.n_ctx = n_ctx
        self.n_words = n_words  # frozen phrase words between the context and the class name (shared by every prompt)
        self.depth = depth  # layers with their own context: 1 (CoOp) .. the tower's depth
        self.length = int(eot_positions(tokens).max()) + 1  # positions the fast path keeps (a Python int)
        self.context = nn.Parameter(context)  # (M, width) or (K, M, width)
        if depth > 1:  # the context of layers 2..J (`VPT_shallow` of MaPLe's IVLP text blocks)
            deep = torch.empty(depth - 1, n_ctx, width, device=context.device).normal_(0.0, init_std)
            self.deep_context = nn.Parameter(deep)  # (J-1, M, width)
        else:
            self.register_parameter("deep_context", None)
        self.register_buffer("tokens", tokens, persistent=False)  # (K, 77)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)  # (K,)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # (K, 1, width): SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # (K, 77-1-M, width)
        self.class_position = class_position
        if class_position == "end":
            self.register_buffer("order", None, persistent=False)
        else:
            if n_words or depth > 1:
                raise FastpromptError(f"class_position={class_position!r} needs a context of the whole init phrase and "
                                      "text_depth=1 (CoOp's layout); drop n_ctx / text_depth or use class_position='end'")
            self.register_buffer("order", _class_position_order(self.eot, n_ctx, class_position, tokens.shape[1]),
                                 persistent=False)  # (K, 77)

    def _init_last(self, bundle: ClipBundle, classnames: Sequence[str], n_ctx: Optional[int], ctx_init: str,
                   depth: int, class_position: str) -> None:
        """ProGrad's context init (`fill="last"`): zeros, the phrase's first w tokens in the last w slots."""
        if depth != 1 or class_position != "end":
            raise FastpromptError("fill='last' (ProGrad's init) takes text_depth=1 and the class name at the end")
        clip, tokenizer = bundle.model, bundle.tokenizer
        phrase_text = ctx_init.replace("_", " ")
        n_words = len(phrase_text.split(" "))  # the released code counts words, not tokens
        n_ctx = DEFAULT_N_CTX if n_ctx is None else n_ctx
        if n_ctx < n_words:
            raise FastpromptError(f"n_ctx={n_ctx} is fewer than the {n_words} words of the init phrase {phrase_text!r}; "
                                  f"ProGrad fills the last slots with it: pick n_ctx >= {n_words}")
        phrase = tokenize(clip, tokenizer, [phrase_text])  # (1, 77)
        width = bundle.text_width
        context = torch.zeros(n_ctx, width, device=clip.token_embedding.weight.device)  # (M, width)
        context[n_ctx - n_words:] = clip.token_embedding(phrase)[0, 1 : 1 + n_words].float()  # (w, width)
        prefix = " ".join(["X"] * (n_ctx - n_words) + [phrase_text])
        tokens = tokenize(clip, tokenizer, [f"{prefix} {name}." for name in classnames])  # (K, 77)
        embedding = clip.token_embedding(tokens)  # (K, 77, width)
        self.n_ctx = n_ctx
        self.n_words = 0  # what follows the context is per-class suffix (a phrase's extra tokens included)
        self.depth = 1
        self.length = int(eot_positions(tokens).max()) + 1
        self.context = nn.Parameter(context)  # (M, width)
        self.register_parameter("deep_context", None)
        self.register_buffer("tokens", tokens, persistent=False)  # (K, 77)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)  # (K,)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # (K, 1, width): SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)  # (K, 77-1-M, width)
        self.class_position = "end"
        self.register_buffer("order", None, persistent=False)

    def embeddings(self) -> torch.Tensor:
        """Prompt embeddings [K, 77, width] of every class."""
        n_cls = self.token_prefix.shape[0]
        ctx = self.context if self.context.dim() == 3 else self.context.expand(n_cls, -1, -1)  # (K, M, width)
        x = torch.cat([self.token_prefix, ctx.to(self.token_prefix.dtype), self.token_suffix], dim=1)  # (K, 77, width)
        if self.order is not None:  # the class name among the context tokens
            x = torch.gather(x, 1, self.order[:, :, None].expand(-1, -1, x.shape[-1]))  # (K, 77, width)
        return x

    def forward(self, clip, backend: str = "fast") -> torch.Tensor:
        """Text features [K, D] (not normalised) of the learnable prompts.

        Fast path with shared context: SOS + context (+ the init phrase's kept words) run once
        for all classes (exact, see `encode_shared_prefix`); class-specific context only gets
        the EOS truncation."""
        if backend == "fast" and self.context.dim() == 2 and self.order is None:
            sos, words = self.token_prefix[0], self.token_suffix[0, : self.n_words]  # (1, width), (W, width)
            prefix = torch.cat([sos, self.context.to(sos.dtype), words], dim=0)  # (1+M+W, width)
            return encode_shared_prefix(clip, prefix, self.token_suffix[:, self.n_words :], self.eot, self.length,
                                        deep=self.deep_context)
        return encode_embeddings(clip, self.embeddings(), self.eot, backend, self.length, deep=self.deep_context)

    def conditioned(self, clip, shift: torch.Tensor, backend: str = "fast") -> torch.Tensor:
        """Text features [B, K, D] (not normalised) of every class's prompt with the context
        `u + shift_b` for each of the B rows of `shift` [B, width] (CoCoOp's `ctx_shifted`).

        Fast path: the B prefixes `[SOS, u + shift_b]` (+ the init phrase's kept words) run
        once each and the B·K class suffixes attend to their own image's prefix
        (`encode_prefix_groups`), EOS-truncated; reference: each row's K full prompts through
        the full-length tower, as `encode_text`."""
        if self.context.dim() != 2 or self.order is not None:
            raise FastpromptError("conditioned context needs one context shared by every class, the class name at the "
                                  "end; drop csc and class_position")
        dtype = self.token_prefix.dtype
        n_rows, n_cls = shift.shape[0], self.token_prefix.shape[0]
        ctx = (self.context + shift[:, None, :]).to(dtype)  # (B, M, width): one shift for every context token
        if backend == "fast":
            sos = self.token_prefix[:1].expand(n_rows, -1, -1)  # (B, 1, width)
            words = self.token_suffix[:1, : self.n_words].expand(n_rows, -1, -1)  # (B, W, width)
            prefix = torch.cat([sos, ctx, words], dim=1)  # (B, 1+M+W, width)
            return encode_prefix_groups(clip, prefix, self.token_suffix[:, self.n_words :], self.eot, self.length,
                                        deep=self.deep_context)  # (B, K, D)
        feats = []
        for row in ctx:  # (M, width): one image's context, all K classes' full prompts
            prompts = torch.cat([self.token_prefix, row.expand(n_cls, -1, -1), self.token_suffix], dim=1)  # (K, 77, width)
            feats.append(encode_embeddings(clip, prompts, self.eot, backend, deep=self.deep_context))  # (K, D)
        return torch.stack(feats)  # (B, K, D)


def packed_features(contexts: Sequence[CoopContext], clip, backend: str = "fast") -> torch.Tensor:
    """Text features [N, K, D] (not normalised) of N packed runs' learnable prompts of one layout
    (the same classes and options: the frozen tokens around the context are the first's), in one
    pass of the text tower over N·K prompts; row n equals `contexts[n](clip, backend)`.

    Fast path with shared context: the N prefixes `[SOS, u_n]` (+ kept words) run once each
    and the N·K class suffixes attend to their own run's prefix (`encode_prefix_groups`, G = N);
    otherwise (class-specific context, a class position, the reference backend) the N·K full
    prompts through `encode_embeddings`, as each run alone."""
    first = contexts[0]
    deep = None if first.deep_context is None else torch.stack([c.deep_context for c in contexts])  # (N, J-1, M, width)
    if backend == "fast" and first.context.dim() == 2 and first.order is None:
        sos, words = first.token_prefix[0], first.token_suffix[0, : first.n_words]  # (1, width), (W, width)
        prefix = torch.stack([torch.cat([sos, c.context.to(sos.dtype), words], dim=0) for c in contexts])  # (N, 1+M+W, width)
        return encode_prefix_groups(clip, prefix, first.token_suffix[:, first.n_words :], first.eot, first.length,
                                    deep=deep)  # (N, K, D)
    n_runs, n_cls = len(contexts), first.eot.shape[0]
    x = torch.cat([c.embeddings() for c in contexts])  # (N·K, 77, width): row n·K + k is run n's class k
    rows = None if deep is None else deep.repeat_interleave(n_cls, dim=0)  # (N·K, J-1, M, width)
    return encode_embeddings(clip, x, first.eot.repeat(n_runs), backend, first.length, deep=rows).view(n_runs, n_cls, -1)


def _class_position_order(eot: torch.Tensor, n_ctx: int, position: str, total: int) -> torch.Tensor:
    """Positions [K, 77] of the "end" layout `[SOS, ctx (M), CLASS (L_k), ".", EOS, ...]` that make
    the `position` layout: front `[SOS, CLASS, ctx, ...]`, middle `[SOS, ctx[:M//2], CLASS,
    ctx[M//2:], ...]` (CoOp's `half_n_ctx = n_ctx // 2`); L_k = eot_k - 2 - M (the tokens
    between the context and the "."), the rest in place."""
    rows = []
    for e in eot.tolist():
        length = e - 2 - n_ctx  # the class name's tokens
        ctx, name = list(range(1, 1 + n_ctx)), list(range(1 + n_ctx, 1 + n_ctx + length))
        half = n_ctx // 2
        moved = name + ctx if position == "front" else ctx[:half] + name + ctx[half:]
        rows.append([0] + moved + list(range(1 + n_ctx + length, total)))
    return torch.tensor(rows, device=eot.device)
