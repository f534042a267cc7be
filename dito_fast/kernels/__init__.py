"""Hand-written kernels behind the fused ops in :mod:`dito_fast.ops` (one subpackage per kernel language)."""
