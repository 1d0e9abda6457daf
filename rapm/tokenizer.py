"""An exact CLIP BPE tokenizer built offline from the vocabulary that ships with open_clip.

The construction is OpenAI's (``simple_tokenizer.py``): 256 byte symbols, the same with an
end-of-word marker, 48,894 merges and the two special tokens, 49,408 entries in all. It is
what SD1.5's and SDXL's ``CLIPTokenizer`` hold, so the toy teacher's tokenizer is a real one.
"""

from __future__ import annotations

import functools
import gzip

VOCAB_SIZE = 49408


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # 48,894 merges, as in OpenAI CLIP
    symbols = list(bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols]
    symbols += ["".join(m.split()) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    if len(symbols) != VOCAB_SIZE:
        raise RuntimeError(f"open_clip BPE file gave {len(symbols)} symbols, expected {VOCAB_SIZE}")
    return {s: i for i, s in enumerate(symbols)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` identical to OpenAI CLIP's, with no download."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], model_max_length=model_max_length
    )
