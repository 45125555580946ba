"""Model-parallel RNG: dropout inside tensor-parallel regions differs per TP rank, outside it is shared.

The default generator is seeded identically on every tensor-parallel rank (so replicated
activations get identical dropout masks); a tracked "model-parallel" state, seeded with a per-TP-rank
offset, is swapped in for the sharded regions (attention heads, sequence-parallel shards). All seeds
derive from one user seed, as in Megatron-LM (offset 2718, plus 100 per pipeline stage), and the
states can be saved and restored for exact resume.

Context-parallel ranks hold different positions of the same samples, so both streams are offset per
CP rank too (``CP_SEED_STRIDE``): otherwise every CP rank would draw the same dropout mask for its
part, a pattern that repeats within each sample. (Megatron-LM seeds CP ranks alike.) CP rank 0 keeps
the seeds of a run without CP.
"""

from __future__ import annotations

import contextlib

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
CP_SEED_STRIDE = 1_000_003  # per CP rank; far beyond the pipeline (100 per stage) and TP (2718 + rank) offsets


def _get_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states of one device type ("cpu" or "cuda"), forked in and out of use."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise ValueError(f"RNG state {name!r} already exists")
        outside = _get_state(self.device)
        torch.manual_seed(seed)
        self.states[name] = _get_state(self.device)
        _set_state(outside, self.device)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Run the block with the tracked state ``name``; it advances, the outside state does not."""
        outside = _get_state(self.device)
        _set_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(outside, self.device)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}


def model_parallel_rng(seed: int, tp_rank: int = 0, pp_rank: int = 0, device: str = "cpu",
                       cp_rank: int = 0) -> RNGStatesTracker:
    """Seed the default generator (shared by TP ranks) and return a tracker with the per-TP-rank state."""
    default_seed = seed + 100 * pp_rank + CP_SEED_STRIDE * cp_rank
    torch.manual_seed(default_seed)  # seeds CUDA generators too when present
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, default_seed + 2718 + tp_rank)
    return tracker
