"""Rotary position embedding (RoPE) with the context-extension scalings of ``RopeConfig``.

Rotate-half convention (GPT-NeoX / Hugging Face Llama): the head dim is split into two halves and
pair ``(i, i + D/2)`` is rotated by ``pos * inv_freq[i]``. Frequencies match Hugging Face's rope init
functions so converted checkpoints see exactly the angles they were trained with.
"""

from __future__ import annotations

import math

import torch

from longctx_megatron.config.errors import ConfigError
from longctx_megatron.config.rope import RopeConfig


def _check_head_dim(cfg: RopeConfig, head_dim: int) -> None:
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"rope head_dim={head_dim} must be a positive even number (RoPE rotates pairs)")
    if cfg.scaling == "ntk" and head_dim == 2:
        raise ConfigError("rope head_dim=2 is too small for ntk scaling (its base exponent is D/(D-2))")


def _pos_freqs(theta: float, head_dim: int, device) -> torch.Tensor:
    """``theta ** (2i / D)`` in float32, computed as Hugging Face does so results match bit for bit."""
    return theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def _inv_freq(theta: float, head_dim: int, device) -> torch.Tensor:
    """Unscaled frequencies ``theta ** (-2i / D)``."""
    return 1.0 / _pos_freqs(theta, head_dim, device)


def _yarn(cfg: RopeConfig, head_dim: int, device) -> torch.Tensor:
    """YaRN: interpolate low frequencies, keep high ones, linear ramp in between (HF, truncate=True)."""

    def correction_dim(num_rotations: float) -> float:
        # Dimension index whose wavelength fits num_rotations times into the original context.
        ratio = cfg.original_max_position / (num_rotations * 2 * math.pi)
        return head_dim * math.log(ratio) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    dims = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    extrapolation_weight = 1 - ((dims - low) / (high - low)).clamp(0, 1)

    pos_freqs = _pos_freqs(cfg.theta, head_dim, device)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (cfg.factor * pos_freqs)
    return inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight


def _llama3(cfg: RopeConfig, head_dim: int, device) -> torch.Tensor:
    """Llama 3.1: divide long wavelengths by factor, keep short ones, blend smoothly in between."""
    inv_freq = _inv_freq(cfg.theta, head_dim, device)
    low_freq_wavelen = cfg.original_max_position / cfg.low_freq_factor
    high_freq_wavelen = cfg.original_max_position / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
        cfg.high_freq_factor - cfg.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_frequencies(cfg: RopeConfig, head_dim: int, device=None) -> tuple[torch.Tensor, float]:
    """Return the float32 ``inv_freq`` (shape ``head_dim // 2``) and the cos/sin ``attention_factor``.

    The attention factor is 1.0 except for yarn, where it is ``0.1 * ln(factor) + 1`` (for factor > 1)
    to counter the attention-entropy change of interpolated positions.
    """
    _check_head_dim(cfg, head_dim)
    if cfg.scaling == "none":
        return _inv_freq(cfg.theta, head_dim, device), 1.0
    if cfg.scaling == "linear":
        # Dividing the frequencies is the same as dividing the positions (position interpolation).
        return _inv_freq(cfg.theta, head_dim, device) / cfg.factor, 1.0
    if cfg.scaling == "ntk":
        # Static NTK-aware: stretch the base so the lowest frequency is divided by exactly `factor`.
        base = cfg.theta * cfg.factor ** (head_dim / (head_dim - 2))
        return _inv_freq(base, head_dim, device), 1.0
    if cfg.scaling == "yarn":
        attention_factor = 0.1 * math.log(cfg.factor) + 1.0 if cfg.factor > 1 else 1.0
        return _yarn(cfg, head_dim, device), attention_factor
    return _llama3(cfg, head_dim, device), 1.0  # the last of ROPE_SCALING_TYPES


class RotaryEmbedding(torch.nn.Module):
    """Maps positions to the ``(cos, sin)`` tables consumed by :func:`apply_rotary`.

    Holds no parameters or buffers: models are built on the meta device and materialised with
    ``to_empty``, which would leave a buffer uninitialised. The frequencies are recomputed on the
    positions' device in every forward, which costs ``head_dim / 2`` elements.
    """

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        _check_head_dim(cfg, head_dim)
        self.head_dim = head_dim
        self.cfg = cfg

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids`` (T,) or (B, T) int64 -> float32 ``cos, sin`` of shape (B or 1, T, head_dim)."""
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must have shape (T,) or (B, T), got {tuple(position_ids.shape)}")
        inv_freq, attention_factor = rope_frequencies(self.cfg, self.head_dim, device=position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * attention_factor, emb.sin() * attention_factor

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scaling={self.cfg.scaling}, theta={self.cfg.theta}, factor={self.cfg.factor}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos, sin`` (B or 1, T, D); computed in float32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    out = xf * cos.unsqueeze(1).float() + rotated_half * sin.unsqueeze(1).float()
    return out.to(x.dtype)
