"""The text tower on embeddings: EOS truncation (fast) equals CLIP's own 77-token encode_text."""

import torch

from fastprompt.models.clip import load_clip
from fastprompt.models.text import encode_tokens, tokenize


def test_both_backends_equal_encode_text(tiny_clip):
    bundle = load_clip(tiny_clip)
    texts = ["a photo of a cat.", "x", "a much longer prompt with many more words in it than the others."]
    tokens = tokenize(tiny_clip, bundle.tokenizer, texts)
    want = tiny_clip.encode_text(tokens)
    for backend in ("reference", "fast"):
        got = encode_tokens(tiny_clip, tokens, backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
