"""megasynth: Megatron-style pretraining of Llama-3-style decoders (with QK-norm) on real and synthetic data."""

__version__ = "0.1.0"
