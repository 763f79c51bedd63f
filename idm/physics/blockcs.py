"""Scrambled block compressed sensing, the measurement of IDM (Chen et al., "Invertible Diffusion
Models for Compressed Sensing", IEEE TPAMI 2025)."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange

from ..errors import IDMError, check_ratio
from ._args import as_int, count_for_ratio, image_size_2d
from .base import LinearOperator
from .canvas import padded_size


class OrthonormalRows:
    """A ``(rows, n)`` matrix Φ with orthonormal rows, computed lazily from ``seed``.

    Φ = (U·Vᵀ)[:, :rows]ᵀ where U·S·Vᵀ is the SVD of an n×n standard Gaussian matrix drawn in
    float64 with ``torch.Generator().manual_seed(seed)`` (U·Vᵀ is a random orthogonal matrix; its
    first ``rows`` columns, transposed, as in the official IDM code). One instance is shared by a
    family of :class:`BlockCS` operators (``redraw``, ``with_image_size``) so the SVD runs once;
    copies cast to each (dtype, device) are cached here.
    """

    def __init__(self, n: int, rows: int, seed: int) -> None:
        self.n, self.rows, self.seed = n, rows, seed
        self._master: torch.Tensor | None = None
        self._cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def master(self) -> torch.Tensor:
        """Φ in float64 on the CPU, shape ``(rows, n)``."""
        if self._master is None:
            generator = torch.Generator().manual_seed(self.seed)
            gaussian = torch.randn(self.n, self.n, generator=generator, dtype=torch.float64)
            u, _, vh = torch.linalg.svd(gaussian)
            self._master = (u @ vh)[:, : self.rows].T.contiguous()
        return self._master

    def get(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Φ as ``dtype`` on ``device``, shape ``(rows, n)``."""
        if not (dtype.is_floating_point or dtype.is_complex):
            raise IDMError(f"block CS needs floating-point tensors, got {dtype}")
        key = (dtype, torch.device(device))
        if key not in self._cast:
            self._cast[key] = self.master.to(device=device, dtype=dtype)
        return self._cast[key]


class BlockCS(LinearOperator):
    """Scrambled block CS: pad, permute all pixels, cut into N-vectors, multiply each by Φ.

    The image (``image_size`` = (H, W)) is zero-padded at the bottom/right to ``domain_size``, a
    multiple of ``block_size`` B. All H'·W' pixels of the padded image are permuted by a random
    permutation drawn from ``seed`` and the permuted vector is cut into ``n_blocks`` consecutive
    N-vectors (N = B²), each multiplied by Φ (q × N, orthonormal rows, q = ceil(ratio·N), drawn
    from ``matrix_seed``). Measurements have shape ``(B, C, n_blocks, q)``; channels are measured
    independently. Because Φ has orthonormal rows, A·Aᵀ = I and A† = Aᵀ.

    Args:
        image_size: (H, W) of the user's images.
        ratio: sampling ratio in (0, 1].
        block_size: B (32 in the paper).
        seed: seed of the pixel permutation (redrawn per training batch with :meth:`redraw`).
        matrix_seed: seed of Φ.
        noise_sigma: std of additive Gaussian measurement noise (image scale [0, 1]).
    """

    kind = "blockcs"

    def __init__(
        self,
        image_size: tuple[int, ...],
        ratio: float,
        block_size: int = 32,
        seed: int = 0,
        matrix_seed: int = 0,
        noise_sigma: float = 0.0,
    ) -> None:
        super().__init__(image_size, noise_sigma)
        image_size_2d(self.kind, self.image_size)
        self.ratio = check_ratio(ratio)
        self.block_size = as_int("block size", block_size, minimum=1)
        self.seed = as_int("permutation seed", seed)
        self.matrix_seed = as_int("matrix seed", matrix_seed)
        self.block_pixels = self.block_size**2
        self.rows = count_for_ratio(self.ratio, self.block_pixels)
        self._domain = padded_size(self.image_size, self.block_size)
        self.n_blocks = self._domain[0] * self._domain[1] // self.block_pixels
        self._matrix = OrthonormalRows(self.block_pixels, self.rows, self.matrix_seed)
        self._permutations: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def domain_size(self) -> tuple[int, ...]:
        return self._domain

    @property
    def matrix(self) -> torch.Tensor:
        """Φ, float64 on the CPU, shape ``(q, N)`` with orthonormal rows."""
        return self._matrix.master

    def permutation(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(perm, inverse) index vectors of length H'·W': ``scrambled[i] = flat[perm[i]]``."""
        device = torch.device(device)
        if device not in self._permutations:
            pixels = self._domain[0] * self._domain[1]
            generator = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(pixels, generator=generator)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(pixels)
            self._permutations[device] = (perm.to(device), inverse.to(device))
        return self._permutations[device]

    # --- the operator -------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H', W')`` → ``(B, C, n_blocks, q)``."""
        self.check_domain(x)
        phi = self._matrix.get(x.dtype, x.device)
        perm, _ = self.permutation(x.device)
        scrambled = rearrange(x, "b c h w -> b c (h w)").index_select(-1, perm)
        return rearrange(scrambled, "b c (n p) -> b c n p", p=self.block_pixels) @ phi.T

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, C, n_blocks, q)`` → ``(B, C, H', W')``."""
        self.check_measurements(y)
        phi = self._matrix.get(y.dtype, y.device)
        _, inverse = self.permutation(y.device)
        scrambled = rearrange(y @ phi, "b c n p -> b c (n p)")
        return rearrange(scrambled.index_select(-1, inverse), "b c (h w) -> b c h w", h=self._domain[0])

    def exact_norm_squared(self) -> float:
        """1: Φ has orthonormal rows, so AᵀA is an orthogonal projection."""
        return 1.0

    def A_dagger(self, y: torch.Tensor) -> torch.Tensor:
        """A† = Aᵀ (Φ has orthonormal rows)."""
        return self.A_adjoint(y)

    def measurement_shape(self, batch: int, channels: int) -> tuple[int, ...]:
        return (batch, channels, self.n_blocks, self.rows)

    # --- families -----------------------------------------------------------------------
    def redraw(self, seed: int) -> "BlockCS":
        """The same operator (sharing Φ, no new SVD) with the permutation drawn from ``seed``."""
        return self._sibling(seed=seed)

    def with_image_size(self, image_size: tuple[int, ...]) -> "BlockCS":
        """The same operator (same seeds, sharing Φ) for images of another size."""
        return self._sibling(image_size=tuple(image_size))

    def _sibling(self, **changes: Any) -> "BlockCS":
        sibling = BlockCS(**{**self.config_args(), **changes})
        sibling._matrix = self._matrix
        return sibling

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "ratio": self.ratio,
            "block_size": self.block_size,
            "seed": self.seed,
            "matrix_seed": self.matrix_seed,
        }
