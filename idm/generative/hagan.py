"""HA-GAN: memory-amortized hierarchical 3D generation (Sun et al., "Hierarchical Amortized GAN for 3D
High Resolution Medical Image Synthesis", IEEE JBHI 26(8), 2022).

Per training iteration the generator produces, from one latent ``z ~ N(0, I_L)``,

* ``f = G^A(z)``: a common feature volume ``(B, C_f, D/s, H/s, W/s)`` (the *trunk*, whole volume);
* ``x^L = G^L(f)``: the whole volume at low resolution ``(B, 1, D/s, H/s, W/s)``;
* ``x^H = G^H(f[p : p + m + halo])``: one high-resolution sub-volume ``(B, 1, S_d, S_h, S_w)`` at a randomly
  drawn position ``p`` (feature voxels; ``m = S / s``),

so the memory of the high-resolution part is that of a sub-volume, whatever the output size; at
inference ``G^H`` runs over the whole feature volume, chunk by chunk along z (:meth:`Generator.full`).
``s = 2^k`` is the ``factor`` between the two resolutions (the paper: 4). Unlike the paper, ``G^H`` is
run on its crop with a *halo* of context feature voxels (:func:`head_halo`, the head's receptive field) and
holds no normalisation over space (pixel norm only), so a sub-volume is **exactly** the corresponding
part of the full volume and the chunked full volume equals the stitched sub-volumes (no seams).

Two discriminators: ``D^H(x^H, c(p))`` sees the sub-volume and its position ``c(p) = p / (F − m) ∈ [0, 1]³``
(per axis; 0 where the sub-volume spans the axis), concatenated to its pooled features as in the paper;
``D^L(x^L)`` sees the whole low-resolution volume. With the non-saturating GAN loss
(``softplus(−t) = −log σ(t)``, the paper's binary cross-entropy), real sub-volume ``x_r^H = x[sp : sp + S]``
and low-resolution real ``x_r^L = avgpool_s(x)``::

    L_D = E[softplus(−D^H(x_r^H, c)) + softplus(D^H(x^H, c))] + E[softplus(−D^L(x_r^L)) + softplus(D^L(x^L))]
    L_G = E[softplus(−D^H(x^H, c))] + E[softplus(−D^L(x^L))]

The encoder has the same hierarchy: ``E^H`` maps a high-resolution sub-volume to its feature crop, trained
with ``L_{E^H} = ‖G^H(E^H(x_r^H)) − x_r^H‖₁``; ``E^G`` maps the feature volume of a whole real volume
(``E^H`` over its tiles, without gradient) to a latent ``ẑ``, trained with
``L_{E^G} = ½ (‖G^L(G^A(ẑ)) − x_r^L‖₁ + ‖G^H(G^A(ẑ))_p − x_r^H‖₁)``. ``encode`` + ``generate`` reconstruct a volume.

Value ranges: the networks work on ``[−1, 1]`` (tanh outputs; :func:`to_model_range`), volumes given to
and returned by :meth:`HAGAN.generate` / :meth:`HAGAN.encode` / :meth:`HAGAN.reconstruct` are on [0, 1]
(CT: :func:`idm.io.medical.hu_window`). Shapes are ``(B, 1, D, H, W)`` = (batch, channel, z, y, x).

Widths: the generator has ``levels`` ×2 upsamplings from a base grid ``shape / 2^levels``; the block that
outputs level ``ℓ`` (resolution ``shape / 2^ℓ``) has ``width(ℓ) = min(max_width, top_width · 2^ℓ)``
channels (:meth:`HAGANConfig.width`). Levels ``levels … k`` are the trunk, ``k … 0`` the head (``s = 2^k``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import IDMError

Shape3 = tuple[int, int, int]


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [−1, 1] (``2x − 1``)."""
    return x * 2 - 1


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] → [0, 1], clipped."""
    return ((x + 1) / 2).clamp(0, 1)


def _shape3(value: Any, what: str) -> Shape3:
    if isinstance(value, int):
        value = (value,) * 3
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise IDMError(f"{what} must be three integers (D, H, W), got {value!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise IDMError(f"{what} must be three positive integers (D, H, W), got {value!r}")
    return shape  # type: ignore[return-value]


@dataclass
class HAGANConfig:
    """Sizes of an HA-GAN (module docstring).

    ``shape``: output volume (D, H, W); ``factor``: s, a power of 2 ≥ 2 (low resolution = shape / s);
    ``sub_shape``: the high-resolution sub-volume of an iteration (default: the paper's slab, depth
    D/8 (at least s) × H × W), each side a multiple of s and ≤ the shape; ``levels``: ×2 upsamplings
    from the base grid (default: down to a smallest base side of 4; every side must be a multiple of
    2^levels and levels > log2 s); ``latent_dim``: L; ``top_width`` / ``max_width``: the width rule;
    ``d_width``: first discriminator / encoder width (doubling per stride-2 level, capped at
    ``max_width``).
    """

    shape: Shape3 = (64, 64, 64)
    factor: int = 4
    sub_shape: Shape3 | None = None
    levels: int | None = None
    latent_dim: int = 128
    top_width: int = 4
    max_width: int = 64
    d_width: int = 8
    modality: str = "CT"
    spacing: tuple[float, float, float] = field(default=(3.0, 3.0, 3.0))

    def __post_init__(self) -> None:
        self.shape = _shape3(self.shape, "the volume shape")
        s = int(self.factor)
        if s < 2 or s & (s - 1):
            raise IDMError(f"the HA-GAN factor must be a power of 2 >= 2, got {self.factor}")
        self.factor = s
        if self.levels is None:
            self.levels = max(int(math.log2(s)) + 1, int(math.floor(math.log2(min(self.shape) / 4))))
        if self.levels <= math.log2(s):
            raise IDMError(f"levels ({self.levels}) must exceed log2 of the factor {s}")
        unit = 2 ** self.levels
        if any(n % unit for n in self.shape):
            raise IDMError(f"volume shape {self.shape} does not divide the hierarchy: every side must be a multiple "
                           f"of 2^{self.levels} = {unit}")
        if self.sub_shape is None:
            d = self.shape[0]
            self.sub_shape = (max(s, d // 8 // s * s), self.shape[1], self.shape[2])
        self.sub_shape = _shape3(self.sub_shape, "the sub-volume shape")
        if any(m % s or m > n for m, n in zip(self.sub_shape, self.shape)):
            raise IDMError(f"sub-volume {self.sub_shape} must have sides that are multiples of the factor {s} "
                           f"and no larger than the volume {self.shape}")
        for name in ("latent_dim", "top_width", "max_width", "d_width"):
            if int(getattr(self, name)) < 1:
                raise IDMError(f"HA-GAN {name} must be >= 1, got {getattr(self, name)}")
        self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]

    @property
    def head_levels(self) -> int:
        """k = log2 s: the levels of the high-resolution head."""
        return int(math.log2(self.factor))

    @property
    def base_shape(self) -> Shape3:
        return tuple(n >> self.levels for n in self.shape)  # type: ignore[return-value]

    @property
    def low_shape(self) -> Shape3:
        """The low-resolution (and feature) grid, shape / s."""
        return tuple(n // self.factor for n in self.shape)  # type: ignore[return-value]

    @property
    def sub_features(self) -> Shape3:
        """m = sub_shape / s: the sub-volume in feature voxels."""
        return tuple(n // self.factor for n in self.sub_shape)  # type: ignore[return-value]

    def width(self, level: int) -> int:
        """Channels of the generator at level ℓ (resolution shape / 2^ℓ): min(max_width, top_width · 2^ℓ)."""
        return min(self.max_width, self.top_width * 2 ** level)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("shape", "sub_shape", "spacing"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HAGANConfig:
        from ..errors import check_keys

        check_keys(data, cls.__dataclass_fields__, "HA-GAN config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class PixelNorm(nn.Module):
    """``x / sqrt(mean_c x² + ε)``: normalisation over channels only (local, so crops equal the whole)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


def _up_block(cin: int, cout: int, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, padding=1), norm,
                         nn.LeakyReLU(0.2))


def head_halo(head_levels: int) -> tuple[int, int]:
    """Context (left, right), in feature voxels, that the head (``head_levels`` × [nearest ×2 upsampling,
    3³ convolution], then a 3³ convolution to the image) needs around a crop for its output on the crop to
    equal the output on the whole volume: the receptive field, propagated back through the layers."""
    ops = [op for _ in range(head_levels) for op in ("up", "conv")] + ["conv"]
    start, size = 1000, 7
    lo, hi = start * 2 ** head_levels, (start + size) * 2 ** head_levels
    for op in reversed(ops):
        if op == "conv":
            lo, hi = lo - 1, hi + 1
        else:
            lo, hi = lo // 2, -(-hi // 2)
    return start - lo, hi - (start + size)


class Generator(nn.Module):
    """``G^A`` (trunk: latent → features), ``G^L`` (features → low-resolution volume) and ``G^H``
    (feature crop → high-resolution sub-volume); all outputs on [−1, 1]."""

    def __init__(self, config: HAGANConfig) -> None:
        super().__init__()
        c, k = config, config.head_levels
        self.config = config
        self.base_shape = c.base_shape
        top = c.width(c.levels)
        self.fc = nn.Linear(c.latent_dim, top * math.prod(self.base_shape))
        self.base = nn.Sequential(nn.GroupNorm(_groups(top), top), nn.LeakyReLU(0.2))
        self.trunk = nn.Sequential(*[
            _up_block(c.width(level), c.width(level - 1), nn.GroupNorm(_groups(c.width(level - 1)), c.width(level - 1)))
            for level in range(c.levels, k, -1)])
        self.to_low = nn.Conv3d(c.width(k), 1, 3, padding=1)
        self.head = nn.Sequential(*[_up_block(c.width(level), c.width(level - 1), PixelNorm())
                                    for level in range(k, 0, -1)])
        self.to_high = nn.Conv3d(c.width(0), 1, 3, padding=1)
        self.halo = head_halo(k)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """``G^A``: ``(B, L)`` → ``(B, C_f, D/s, H/s, W/s)``."""
        if z.ndim != 2 or z.shape[1] != self.config.latent_dim:
            raise IDMError(f"latent must be (B, {self.config.latent_dim}), got {tuple(z.shape)}")
        x = self.fc(z).view(z.shape[0], -1, *self.base_shape)
        return self.trunk(self.base(x))

    def low(self, features: torch.Tensor) -> torch.Tensor:
        """``G^L``: the whole volume at low resolution ``(B, 1, D/s, H/s, W/s)``."""
        return torch.tanh(self.to_low(features))

    def render(self, features: torch.Tensor) -> torch.Tensor:
        """``G^H`` on the given features as they are (zero padding at their edges): ``(B, 1, s·d, s·h, s·w)``."""
        return torch.tanh(self.to_high(self.head(features)))

    def high(self, features: torch.Tensor, start: Sequence[int], size: Sequence[int] | None = None) -> torch.Tensor:
        """``G^H`` on the crop ``features[start : start + size]`` (feature voxels, per axis; ``size`` default
        m = sub_shape / s) with its halo of context: exactly the same voxels as the whole volume's
        ``(s·start, s·size)`` part, ``(B, 1, s·size)``."""
        size = self.config.sub_features if size is None else tuple(int(v) for v in size)
        grid = features.shape[2:]
        if any(p < 0 or p + m > n for p, m, n in zip(start, size, grid)):
            raise IDMError(f"sub-volume at {tuple(start)} of size {tuple(size)} leaves the feature grid {tuple(grid)}")
        left, right = self.halo
        lo = [max(0, p - left) for p in start]
        hi = [min(n, p + m + right) for p, m, n in zip(start, size, grid)]
        out = self.render(features[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        s = self.config.factor
        o = [(p - a) * s for p, a in zip(start, lo)]
        return out[:, :, o[0]:o[0] + s * size[0], o[1]:o[1] + s * size[1], o[2]:o[2] + s * size[2]]

    def full(self, features: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """The whole high-resolution volume ``(B, 1, D, H, W)``: ``G^H`` over slabs of ``chunk`` feature slices
        along z (default m_z, the sub-volume's depth), each with its halo, concatenated."""
        depth = features.shape[2]
        chunk = self.config.sub_features[0] if chunk is None else int(chunk)
        if chunk < 1:
            raise IDMError(f"the chunk must be >= 1 feature slice, got {chunk}")
        parts = [self.high(features, (z, 0, 0), (min(chunk, depth - z), *features.shape[3:]))
                 for z in range(0, depth, chunk)]
        return torch.cat(parts, dim=2)

    def full_unchunked(self, features: torch.Tensor) -> torch.Tensor:
        """``G^H`` on the whole feature volume at once: the generator of the full-resolution GAN of the
        same widths (the memory baseline), equal to :meth:`full`."""
        return self.render(features)


def _stride_levels(shape: Sequence[int]) -> int:
    """Stride-2 levels of a discriminator / encoder on ``shape``: down to a smallest side of 2 (at least 1)."""
    return max(1, int(math.floor(math.log2(max(1, min(shape))))) - 1)


class Discriminator(nn.Module):
    """Spectrally normalised 3D CNN on volumes of one ``shape``: stride-2 3³ convolutions (widths
    ``d_width · 2^i`` capped at ``max_width``, LeakyReLU 0.2) down to a smallest side of 2, flattened (the
    layout is kept, as in the paper), then (``positional``) the position code ``c ∈ [0, 1]³`` concatenated,
    two linear layers → one logit per volume ``(B,)``."""

    def __init__(self, shape: Sequence[int], d_width: int, max_width: int, positional: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, grid = 1, list(shape)
        for i in range(_stride_levels(shape)):
            cout = min(max_width, d_width * 2 ** i)
            layers += [spectral_norm(nn.Conv3d(cin, cout, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            cin, grid = cout, [-(-n // 2) for n in grid]
        self.convs = nn.Sequential(*layers)
        self.positional = positional
        self.fc = nn.Sequential(spectral_norm(nn.Linear(cin * math.prod(grid) + (3 if positional else 0), 64)),
                                nn.LeakyReLU(0.2), spectral_norm(nn.Linear(64, 1)))

    def forward(self, x: torch.Tensor, position: torch.Tensor | None = None) -> torch.Tensor:
        h = self.convs(x).flatten(1)
        if self.positional:
            if position is None:
                raise IDMError("the high-resolution discriminator needs the sub-volume position")
            h = torch.cat([h, position.to(h)], dim=1)
        return self.fc(h)[:, 0]


class Discriminators(nn.Module):
    """``D^H`` (sub-volume + position) and ``D^L`` (whole low-resolution volume)."""

    def __init__(self, config: HAGANConfig) -> None:
        super().__init__()
        self.high = Discriminator(config.sub_shape, config.d_width, config.max_width, positional=True)
        self.low = Discriminator(config.low_shape, config.d_width, config.max_width, positional=False)


class EncoderHigh(nn.Module):
    """``E^H``: high-resolution sub-volume ``(B, 1, S)`` on [−1, 1] → its features ``(B, C_f, S / s)``
    (a 3³ convolution, then log2 s stride-2 convolutions with the generator's widths)."""

    def __init__(self, config: HAGANConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(1, config.width(0), 3, padding=1), nn.LeakyReLU(0.2)]
        for level in range(1, config.head_levels + 1):
            layers += [nn.Conv3d(config.width(level - 1), config.width(level), 3, stride=2, padding=1),
                       nn.GroupNorm(_groups(config.width(level)), config.width(level)), nn.LeakyReLU(0.2)]
        layers[-1] = nn.Identity()  # features are unbounded, like the trunk's before its activation
        layers.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderGlobal(nn.Module):
    """``E^G``: the feature volume ``(B, C_f, D/s, H/s, W/s)`` → latent ``(B, L)`` (stride-2 convolutions
    down to the base grid, then one linear layer, mirroring the generator's trunk)."""

    def __init__(self, config: HAGANConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for level in range(config.head_levels + 1, config.levels + 1):
            layers += [nn.Conv3d(config.width(level - 1), config.width(level), 3, stride=2, padding=1),
                       nn.GroupNorm(_groups(config.width(level)), config.width(level)), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.fc = nn.Linear(config.width(config.levels) * math.prod(config.base_shape), config.latent_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(features).flatten(1))


class HAGAN(nn.Module):
    """What a checkpoint holds: the generator and the two encoders (the discriminators,
    :class:`Discriminators`, are only needed for training)."""

    def __init__(self, config: HAGANConfig) -> None:
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.encoder_high = EncoderHigh(config)
        self.encoder_global = EncoderGlobal(config)

    # --- positions ---------------------------------------------------------------------------
    def sample_position(self, generator: torch.Generator | None = None) -> tuple[int, int, int]:
        """A sub-volume position (feature voxels), uniform over the valid starts of each axis."""
        grid, m = self.config.low_shape, self.config.sub_features
        return tuple(int(torch.randint(0, n - k + 1, (), generator=generator)) for n, k in zip(grid, m))  # type: ignore[return-value]

    def position_code(self, start: Sequence[int], batch: int) -> torch.Tensor:
        """``c = p / (F − m)`` per axis (0 where the sub-volume spans the axis): ``(batch, 3)`` on [0, 1]."""
        grid, m = self.config.low_shape, self.config.sub_features
        code = [p / (n - k) if n > k else 0.0 for p, n, k in zip(start, grid, m)]
        return torch.tensor(code, dtype=torch.float32).expand(batch, 3)

    def real_views(self, real: torch.Tensor, start: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_r^L, x_r^H)``: a real batch ``(B, 1, D, H, W)`` on [−1, 1] averaged over s³ blocks, and its
        sub-volume at feature position ``start``."""
        s, size = self.config.factor, self.config.sub_shape
        if tuple(real.shape[2:]) != self.config.shape:
            raise IDMError(f"volumes must be {self.config.shape}, got {tuple(real.shape[2:])}")
        o = [p * s for p in start]
        sub = real[:, :, o[0]:o[0] + size[0], o[1]:o[1] + size[1], o[2]:o[2] + size[2]]
        return F.avg_pool3d(real, s), sub

    # --- encoder -------------------------------------------------------------------------------
    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """``E^H`` over tiles of the sub-volume's shape covering ``x`` ``(B, 1, D, H, W)`` on [−1, 1] (the
        last tile of an axis shifted back inside), stitched: ``(B, C_f, D/s, H/s, W/s)``."""
        s, size, grid = self.config.factor, self.config.sub_shape, self.config.low_shape
        starts = [sorted({min(p, n - m // s) for p in range(0, n, m // s)}) for n, m in zip(grid, size)]
        out = x.new_zeros((x.shape[0], self.config.width(self.config.head_levels), *grid))
        for a in starts[0]:
            for b in starts[1]:
                for c in starts[2]:
                    tile = x[:, :, a * s:a * s + size[0], b * s:b * s + size[1], c * s:c * s + size[2]]
                    m = [n // s for n in size]
                    out[:, :, a:a + m[0], b:b + m[1], c:c + m[2]] = self.encoder_high(tile)
        return out

    @torch.no_grad()
    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, L)`` of volumes ``(B, 1, D, H, W)`` on [0, 1] (``E^G(E^H tiles)``)."""
        self._check_volume(volume)
        return self.encoder_global(self.encode_features(to_model_range(volume)))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Whole high-resolution volumes ``(B, 1, D, H, W)`` on [0, 1] from latents ``(B, L)``, the head
        chunked along z (:meth:`Generator.full`)."""
        return from_model_range(self.generator.full(self.generator.features(z), chunk))

    @torch.no_grad()
    def generate_low(self, z: torch.Tensor) -> torch.Tensor:
        """The low-resolution volumes ``(B, 1, D/s, H/s, W/s)`` on [0, 1]."""
        return from_model_range(self.generator.low(self.generator.features(z)))

    def reconstruct(self, volume: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, x̂)``: the latent of ``volume`` (on [0, 1]) and the volume generated from it."""
        z = self.encode(volume)
        return z, self.generate(z, chunk)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, self.config.latent_dim), generator=generator)

    def _check_volume(self, volume: torch.Tensor) -> None:
        if volume.ndim != 5 or volume.shape[1] != 1 or tuple(volume.shape[2:]) != self.config.shape:
            raise IDMError(f"this HA-GAN encodes volumes (B, 1, {', '.join(map(str, self.config.shape))}), "
                           f"got {tuple(volume.shape)}")
        if not bool(torch.isfinite(volume).all()):
            raise IDMError("the volume holds NaN or infinite values")


# --- losses (module docstring) ---------------------------------------------------------------
def discriminator_loss(model: HAGAN, disc: Discriminators, real: torch.Tensor, z: torch.Tensor,
                       start: Sequence[int]) -> torch.Tensor:
    """``L_D`` on a real batch (on [−1, 1]), latents ``z`` and the sub-volume position ``start`` (the fakes
    are generated without gradient)."""
    real_low, real_sub = model.real_views(real, start)
    code = model.position_code(start, real.shape[0]).to(real.device)
    with torch.no_grad():
        features = model.generator.features(z)
        fake_low, fake_sub = model.generator.low(features), model.generator.high(features, start)
    high = F.softplus(-disc.high(real_sub, code)).mean() + F.softplus(disc.high(fake_sub, code)).mean()
    low = F.softplus(-disc.low(real_low)).mean() + F.softplus(disc.low(fake_low)).mean()
    return high + low


def generator_loss(model: HAGAN, disc: Discriminators, z: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
    """``L_G`` (non-saturating) of the sub-volume at ``start`` and the low-resolution volume of ``z``."""
    features = model.generator.features(z)
    code = model.position_code(start, z.shape[0]).to(z.device)
    fake_low, fake_sub = model.generator.low(features), model.generator.high(features, start)
    return F.softplus(-disc.high(fake_sub, code)).mean() + F.softplus(-disc.low(fake_low)).mean()


def encoder_high_loss(model: HAGAN, real: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
    """``L_{E^H} = ‖G^H(E^H(x_r^H)) − x_r^H‖₁`` (mean absolute error, [−1, 1] scale)."""
    _, real_sub = model.real_views(real, start)
    return (model.generator.render(model.encoder_high(real_sub)) - real_sub).abs().mean()


def encoder_global_loss(model: HAGAN, real: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
    """``L_{E^G} = ½ (‖G^L(G^A(ẑ)) − x_r^L‖₁ + ‖G^H(G^A(ẑ))_p − x_r^H‖₁)`` with ``ẑ = E^G(E^H tiles of x)``
    (``E^H`` without gradient)."""
    real_low, real_sub = model.real_views(real, start)
    with torch.no_grad():
        tiles = model.encode_features(real)
    features = model.generator.features(model.encoder_global(tiles))
    low = (model.generator.low(features) - real_low).abs().mean()
    high = (model.generator.high(features, start) - real_sub).abs().mean()
    return (low + high) / 2


# --- the full-resolution baseline (memory study) ---------------------------------------------
def full_gan_losses(model: HAGAN, disc: Discriminator, real: torch.Tensor,
                    z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_D, L_G)`` of the full-resolution 3D GAN of the same generator widths: the trunk and head of
    ``model.generator`` on the whole volume at once, one discriminator ``disc`` (``D^H``'s architecture on
    the whole volume, position code 0). ``L_D`` uses detached fakes; backward each separately."""
    code = torch.zeros((z.shape[0], 3), device=z.device)
    fake = model.generator.full_unchunked(model.generator.features(z))
    d_loss = F.softplus(-disc(real, code)).mean() + F.softplus(disc(fake.detach(), code)).mean()
    g_loss = F.softplus(-disc(fake, code)).mean()
    return d_loss, g_loss


# --- volume preparation and statistics --------------------------------------------------------
def normalise_intensity(volume: torch.Tensor, modality: str) -> torch.Tensor:
    """Intensities → [0, 1]: CT through :func:`idm.io.medical.hu_window` ([−1000, 1000] HU), anything else
    divided by its 99.5th percentile (of the non-zero voxels) and clipped."""
    from ..io.medical import hu_window

    if modality.upper() == "CT":
        return hu_window(volume)
    values = volume[volume > 0]
    top = float(torch.quantile(values[:: max(1, values.numel() // 1_000_000)].float(), 0.995)) if values.numel() else 1.0
    return (volume / max(top, 1e-8)).clamp(0, 1)


def prepare_volume(data: torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float],
                   shape: Sequence[int], modality: str, background: float | None = None,
                   center: Sequence[float] | None = None) -> torch.Tensor:
    """A volume ``(D, H, W)`` (spacing in mm) resampled trilinearly to ``target_spacing``, normalised to
    [0, 1] (:func:`normalise_intensity`) and cropped / padded (with ``background``, default 0) to ``shape``
    around ``center`` (fractions of each axis, default the middle): ``(D, H, W)`` float32."""
    if data.ndim != 3:
        raise IDMError(f"expected a 3-D volume, got shape {tuple(data.shape)}")
    x = normalise_intensity(data.float(), modality)
    size = [max(1, round(n * a / b)) for n, a, b in zip(x.shape, spacing, target_spacing)]
    x = F.interpolate(x[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    center = center or (0.5, 0.5, 0.5)
    out = torch.full(tuple(shape), 0.0 if background is None else float(background))
    src, dst = [], []
    for n, m, c in zip(x.shape, shape, center):
        if n >= m:
            a = min(n - m, max(0, round(c * n - m / 2)))
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = x[tuple(src)]
    return out


def intensity_stats(volumes: torch.Tensor) -> dict[str, float]:
    """Mean and standard deviation of the voxels of ``volumes`` (any shape, on [0, 1])."""
    return {"mean": float(volumes.float().mean()), "std": float(volumes.float().std())}


def mid_slices(volume: torch.Tensor) -> list[torch.Tensor]:
    """The three mid-planes (axial, coronal, sagittal) of a ``(D, H, W)`` volume."""
    d, h, w = volume.shape[-3:]
    return [volume[..., d // 2, :, :], volume[..., :, h // 2, :], volume[..., :, :, w // 2]]


def histogram_distance(a: torch.Tensor, b: torch.Tensor, bins: int = 64) -> float:
    """Earth mover's (Wasserstein-1) distance on [0, 1] between the intensity histograms of ``a`` and ``b``
    (``bins`` bins): the L1 distance of their cumulative histograms times the bin width; 0 = same
    histogram, 1 = all mass at opposite ends."""
    ha = torch.histc(a.float().clamp(0, 1), bins=bins, min=0, max=1)
    hb = torch.histc(b.float().clamp(0, 1), bins=bins, min=0, max=1)
    ca, cb = torch.cumsum(ha / ha.sum(), 0), torch.cumsum(hb / hb.sum(), 0)
    return float((ca - cb).abs().sum() / bins)


def mid_slice_histogram_distance(generated: torch.Tensor, real: torch.Tensor, bins: int = 64) -> float:
    """Mean over the three mid-planes of :func:`histogram_distance` between the pooled mid-plane voxels of
    ``generated`` and of ``real`` (both ``(N, 1, D, H, W)`` or ``(N, D, H, W)`` on [0, 1])."""
    g, r = mid_slices(generated), mid_slices(real)
    return float(sum(histogram_distance(a, b, bins) for a, b in zip(g, r)) / 3)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of a volume or batch of volumes on [0, 1] (any shape ending in ``(H, W)``) over all
    voxels at once: :func:`idm.metrics.psnr` of the voxels laid out as one ``(·, W)`` image."""
    from ..metrics import psnr as image_psnr

    return float(image_psnr(x.reshape(1, 1, -1, x.shape[-1]), ref.reshape(1, 1, -1, ref.shape[-1]))[0])
