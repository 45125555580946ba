"""Parallelism applied to the plain model: process groups, TP/SP layers, RNG, (later) pipeline and DP."""
