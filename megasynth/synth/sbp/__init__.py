"""Synthetic bootstrapped pretraining (Yang et al. 2025): embed the corpus (embed.py), find related document
pairs (pairs.py over ann.py and near_dup.py), turn them into loss-masked training pairs (pair_dataset.py),
sample a synthetic corpus from the trained synthesizer (synthesize.py with samplers.py and shards.py) and
measure it (quality.py)."""
