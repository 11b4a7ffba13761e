"""The fast path's custom kernels, one op a file, each beside its eager reference.

- `prefix_attention`: attention over `[prompt prefix ; tokens]` without materialising the
  concatenation (shared or per-sample prefix, optional causal mask over the tokens).
- `cosine_cross_entropy`: cross-entropy of `scale * cos(x, w)` logits, tiled over classes
  so the (B, C) logit matrix is never stored.

Both are `torch.library` custom ops (`fastprompt::*`), so `torch.compile(fullgraph=True)`
traces through them. `impl="auto"` runs Triton on CUDA and the reference elsewhere.

The package attributes `prefix_attention` and `cosine_cross_entropy` are the functions, which
shadow the submodules of the same name; reach a module through
`importlib.import_module("fastprompt.kernels.prefix_attention")`.
"""

from fastprompt.kernels.cosine_cross_entropy import cosine_cross_entropy, cosine_cross_entropy_reference
from fastprompt.kernels.prefix_attention import prefix_attention, prefix_attention_reference

__all__ = [
    "cosine_cross_entropy",
    "cosine_cross_entropy_reference",
    "prefix_attention",
    "prefix_attention_reference",
]
