"""Tiny random-weight Qwen2 models (and a word-level tokenizer) built inside the tests."""

from __future__ import annotations

import copy
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


def near_copy(model: torch.nn.Module, spread: float = 0.05) -> torch.nn.Module:
    """A copy of ``model`` with each weight moved by ``spread`` times its spread (seeded):
    at 5 % a draft the model agrees with about half the time (an independent random draft
    almost never). The noise is drawn on the CPU, so a copy on a GPU moves as one on the CPU."""
    near = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * spread * p.std())
    return near


def tiny_tokenizer(vocab: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer ('<pad>' 0, '<eos>' 1) trained on a few words, so any
    text tokenizes, as with the real models (vocab >= 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = "the answer is 42 because 6 times 7 def return print hello world " * 20
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def save_tiny(path: Path, seed: int, vocab: int = 300, **kw) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder (fp32 on disk)."""
    tok = tiny_tokenizer(vocab)
    tiny_model(seed, vocab=len(tok), dtype=torch.float32, **kw).save_pretrained(path)
    tok.save_pretrained(path)
    return path
