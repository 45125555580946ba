"""RMSNorm: apex's fused kernel on CUDA when apex is importable, else torch's ``F.rms_norm``.

With ``zero_centered_gamma`` (Megatron's ``--apply-layernorm-1p``) the stored weight is gamma - 1: it
starts at 0 and the gain applied is 1 + weight, formed and applied in fp32 (so 16-bit weights keep
the precision of small deviations from a gain of 1, which is the point of storing gamma - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine
except ImportError:
    fused_rms_norm_affine = None


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = torch.nn.Parameter(torch.zeros(dim) if zero_centered_gamma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_centered_gamma:  # 1 + weight in fp32: in bf16 it would round gains to steps of 2^-7
            gain = self.weight.float() + 1
            return F.rms_norm(x.float(), gain.shape, gain, self.eps).to(x.dtype)
        if fused_rms_norm_affine is not None and x.is_cuda:
            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", zero_centered_gamma" if self.zero_centered_gamma else "")
