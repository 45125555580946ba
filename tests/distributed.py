"""The tests' multi-rank runner: ``run_on_ranks(body, world_size, *args)`` (see parallel/local_ranks.py)."""

from longctx_megatron.parallel.local_ranks import free_port, run_on_ranks

__all__ = ["free_port", "run_on_ranks"]
