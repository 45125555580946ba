"""Parallelism applied to the plain model: process groups, tensor/sequence-parallel layers, RNG streams,
parallelize (TP, SP, recomputation), pipeline plan and schedule, data-parallel buckets and ZeRO-1."""
