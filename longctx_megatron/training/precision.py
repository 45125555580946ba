"""fp16 dynamic loss scaling (bf16 and fp32 need none): Megatron's DynamicGradScaler behaviour.

The loss is multiplied by ``scale`` before backward so small fp16 gradients do not flush to zero;
the gradient buffers divide it out again (DataParallelGradients.finish). A step whose gradients
overflowed is skipped and the scale halves; after ``growth_interval`` clean steps it doubles.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossScaler:
    scale: float
    growth_interval: int = 1000
    clean_steps: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.clean_steps = max(self.scale / 2, 1.0), 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = state["scale"], state["clean_steps"]
