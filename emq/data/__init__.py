"""Datasets held as tensors (or ImageNet streamed from folders), their fixed subsets, the seeded batch
order and shards, and the check of a data folder."""
