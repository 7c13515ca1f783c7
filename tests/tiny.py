"""Tiny random-weight Qwen2 models (and a word-level tokenizer) built inside the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96
EOS = 1


def tiny_model(seed: int, layers: int = 2, width: int = 32, vocab: int = VOCAB,
               dtype: torch.dtype = torch.float64) -> Qwen2ForCausalLM:
    """A random Qwen2 with peaked next-token distributions (large init), in eval mode."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=0,
                      pad_token_id=0)
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: '<pad>' 0, '<eos>' 1, then words 'w2'..'w{vocab-1}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def save_tiny(path: Path, seed: int, vocab: int = VOCAB, **kw) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (fp32 on disk)."""
    tiny_model(seed, vocab=vocab, dtype=torch.float32, **kw).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path
