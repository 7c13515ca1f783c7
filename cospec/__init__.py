"""cospec: collaborative speculative decoding (SPD, CoSpec, CoS) on Hugging Face causal LMs."""

__version__ = "0.1.0"
