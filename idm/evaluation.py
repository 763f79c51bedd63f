"""Evaluate a reconstruction method on images, by the compressed-sensing literature's convention.

Each image (Y channel, [0, 1]) is measured with its own operator (same seeds for every method,
so methods are compared on identical measurements), reconstructed on the operator's padded
domain, cropped back and scored: PSNR with peak 255 and SSIM with scikit-image's 7×7 uniform
window (see :mod:`idm.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .errors import IDMError
from .metrics import psnr, ssim_skimage
from .physics import BlockCS, LinearOperator
from .registry import Reconstruct, get_method

#: (image size, image index) → operator that measures that image
OperatorFactory = Callable[[tuple[int, ...], int], LinearOperator]


def blockcs_factory(ratio: float, seed: int = 0, block_size: int = 32, noise_sigma: float = 0.0,
                    matrix_seed: int = 0) -> OperatorFactory:
    """Scrambled block CS with permutation seed ``seed + index`` for the index-th image.

    All operators share one Φ (of ``block_size`` and ``matrix_seed``, computed once, on first use)."""
    base = BlockCS((block_size, block_size), ratio, block_size=block_size, seed=seed, matrix_seed=matrix_seed,
                   noise_sigma=noise_sigma)

    def make(image_size: tuple[int, ...], index: int) -> LinearOperator:
        return base.redraw(seed + index).with_image_size(image_size)

    return make


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float
    seconds: float


@dataclass
class Evaluation:
    method: str
    ratio: float
    images: list[ImageScore] = field(default_factory=list)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def mean(self) -> dict[str, float]:
        if not self.images:
            raise IDMError("no images were evaluated")
        n = len(self.images)
        return {key: sum(getattr(s, key) for s in self.images) / n for key in ("psnr", "ssim", "seconds")}

    def to_json(self) -> dict:
        """``{"method", "ratio", "images": [{"name", "psnr", "ssim", "seconds"}], "mean": {...}}``."""
        return {"method": self.method, "ratio": self.ratio, "images": [asdict(s) for s in self.images], "mean": self.mean}

    def table(self) -> str:
        width = max([len("image"), *(len(s.name) for s in self.images)])
        lines = [f"{'image':<{width}}  {'PSNR':>7}  {'SSIM':>6}  {'seconds':>8}"]
        for s in self.images:
            lines.append(f"{s.name:<{width}}  {s.psnr:7.2f}  {s.ssim:6.4f}  {s.seconds:8.3f}")
        m = self.mean
        lines.append(f"{'mean':<{width}}  {m['psnr']:7.2f}  {m['ssim']:6.4f}  {m['seconds']:8.3f}")
        return "\n".join(lines)


def evaluate(
    method: str,
    images: Iterable[tuple[str, torch.Tensor]],
    make_operator: OperatorFactory,
    *,
    ratio: float,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    keep_outputs: bool = False,
    progress: bool = False,
    total: int | None = None,
    options: Mapping[str, Any] | None = None,
    reconstruct: Reconstruct | None = None,
) -> Evaluation:
    """Measure, reconstruct and score each ``(name, image (1, H, W) in [0, 1])``.

    ``options``: extra keyword arguments for the method's factory (e.g. ``{"steps": 20}``);
    ``reconstruct``: the method already built (then ``checkpoint`` and ``options`` are unused)."""
    if reconstruct is None:
        reconstruct = get_method(method).build(
            checkpoint=checkpoint, device=device, seed=seed, ratio=ratio, **dict(options or {})
        )
    result = Evaluation(method=method, ratio=ratio)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(images, total=total, desc=method, unit="img", disable=not progress, leave=False)
    for index, (name, image) in enumerate(bar):
        x = image.unsqueeze(0).to(device)
        op = make_operator(tuple(image.shape[1:]), index)
        y = op.measure(x, generator=generator)
        start = time.perf_counter()
        with torch.no_grad():
            estimate = op.crop(reconstruct(y, op)).clamp(0, 1)
        seconds = time.perf_counter() - start
        result.images.append(
            ImageScore(name, float(psnr(estimate, x)[0]), float(ssim_skimage(estimate, x)[0]), seconds)
        )
        if keep_outputs:
            result.outputs[name] = estimate[0].cpu()
    return result
