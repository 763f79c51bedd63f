"""Evaluate a reconstruction method on images, by the compressed-sensing literature's convention.

Each image (Y channel, [0, 1]) is measured with its own operator (same seeds for every method,
so methods are compared on identical measurements), reconstructed on the operator's padded
domain, cropped back and scored: PSNR with peak 255 and SSIM with scikit-image's 7×7 uniform
window (see :mod:`idm.metrics`).

MRI (complex images, :class:`idm.physics.MRI`) is scored by the fastMRI convention instead: on
magnitudes, both divided by the ground truth's maximum magnitude, PSNR ``10·log10(1 / MSE)``
unclipped (= ``skimage``'s PSNR with ``data_range = max|x|``), SSIM as above on the normalised
magnitudes clipped to [0, 1] (:func:`magnitude_scores`). Ground truths may be real magnitude
images in [0, 1] or complex images.

:func:`operator_factory` builds the per-image operators of every operator kind the ``idm``
command offers (block CS, inpainting, super-resolution, MRI, CT).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .errors import IDMError
from .metrics import psnr, ssim_skimage
from .physics import MRI, BlockCS, Inpainting, LinearOperator, ParallelBeamCT, SuperResolution
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


#: operator kinds :func:`operator_factory` builds
FACTORY_KINDS = ("blockcs", "inpainting", "superres", "mri", "ct")


def operator_factory(kind: str, *, seed: int = 0, noise_sigma: float = 0.0, **options: Any) -> OperatorFactory:
    """Per-image operators of ``kind`` (one of :data:`FACTORY_KINDS`); the index-th image gets the
    seed ``seed + index`` (block-CS permutation, inpainting / MRI mask), so methods compared with
    the same factory see identical measurements.

    Options per kind (the operator's own arguments):

    * ``blockcs``: ``ratio``, ``block_size`` (32), ``matrix_seed`` (0) — :func:`blockcs_factory`;
    * ``inpainting``: ``ratio`` (kept pixels);
    * ``superres``: ``factor``;
    * ``mri``: ``acceleration``, ``center_fraction``, ``mask_type`` or an explicit ``mask``
      ((H, W) / (W,) 0/1 tensor: the same for every image, which must then have that size), and
      ``sensitivities``: None (single-coil), an ``(Nc, H, W)`` tensor, or a callable
      ``image_size → (Nc, H, W)`` (e.g. synthetic maps for any image size);
    * ``ct``: ``views``, ``angle_range`` ((θ₀, θ₁) degrees), ``angles`` (explicit), ``detectors``.
    """
    options = dict(options)
    if kind == "blockcs":
        ratio, block_size = options.pop("ratio"), options.pop("block_size", 32)
        matrix_seed = options.pop("matrix_seed", 0)
        _no_extra(kind, options)
        return blockcs_factory(ratio, seed=seed, noise_sigma=noise_sigma, block_size=block_size,
                               matrix_seed=matrix_seed)
    if kind == "inpainting":
        ratio = options.pop("ratio")
        _no_extra(kind, options)
        return lambda size, index: Inpainting(size, ratio=ratio, seed=seed + index, noise_sigma=noise_sigma)
    if kind == "superres":
        factor = options.pop("factor")
        _no_extra(kind, options)
        return lambda size, index: SuperResolution(size, factor, noise_sigma=noise_sigma)
    if kind == "mri":
        sensitivities = options.pop("sensitivities", None)
        mask = options.pop("mask", None)
        mri_args = {key: options.pop(key) for key in ("acceleration", "center_fraction", "mask_type") if key in options}
        _no_extra(kind, options)

        def make_mri(size: tuple[int, ...], index: int) -> LinearOperator:
            sens = sensitivities(tuple(size)) if callable(sensitivities) else sensitivities
            if mask is not None:
                return MRI(size, mask=mask, sensitivities=sens, noise_sigma=noise_sigma)
            return MRI(size, seed=seed + index, sensitivities=sens, noise_sigma=noise_sigma, **mri_args)

        return make_mri
    if kind == "ct":
        ct_args = {key: options.pop(key) for key in ("views", "angles", "angle_range", "detectors") if key in options}
        _no_extra(kind, options)
        return lambda size, index: ParallelBeamCT(size, noise_sigma=noise_sigma, **ct_args)
    raise IDMError(f"unknown operator {kind!r}; available: {', '.join(FACTORY_KINDS)}")


def _no_extra(kind: str, options: Mapping[str, Any]) -> None:
    if options:
        raise IDMError(f"operator {kind!r} takes no option {', '.join(sorted(options))}")


def magnitude_scores(estimate: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastMRI-convention scores of complex (or real) images ``(B, C, H, W)``: ``(psnr, ssim,
    normalised magnitude of estimate)``, per image ``(B,)``.

    Both magnitudes are divided by the ground truth's maximum magnitude (per image); PSNR is
    ``10·log10(1 / MSE)`` on those, unclipped, in float64; SSIM is :func:`ssim_skimage` of the
    normalised magnitudes (clipped to [0, 1] by it)."""
    est, ref = estimate.abs().double(), truth.abs().double()
    peak = ref.amax(dim=(1, 2, 3), keepdim=True)
    if bool((peak <= 0).any()):
        raise IDMError("MRI scores are relative to the ground truth's maximum magnitude, which is 0")
    est, ref = est / peak, ref / peak
    mse = (est - ref).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse), ssim_skimage(est.float(), ref.float()), est.float()


def image_scores(estimate: torch.Tensor, truth: torch.Tensor, op: LinearOperator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(psnr, ssim, scored image)`` per image of a reconstruction ``(B, C, H, W)`` of ``truth`` measured
    by ``op``: MRI and complex images by :func:`magnitude_scores` (the scored image is the magnitude
    over the truth's maximum, unclipped), others clipped to [0, 1] (PSNR peak 255 on the 8-bit scale,
    scikit-image SSIM)."""
    if isinstance(op, MRI) or estimate.is_complex() or truth.is_complex():
        return magnitude_scores(estimate, truth)
    estimate = estimate.clamp(0, 1)
    return psnr(estimate, truth), ssim_skimage(estimate, truth), estimate


def uncertainty_maps(estimate: torch.Tensor, std: torch.Tensor, truth: torch.Tensor, magnitude: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(std, |error|)`` of one reconstruction on the scale :func:`image_scores` scores it on:
    ``magnitude`` (MRI, complex images): both over the truth's largest magnitude, the error of the
    magnitudes unclipped; otherwise the std as is and the error of the estimate clipped to [0, 1]."""
    if magnitude:
        peak = truth.abs().amax()
        return std / peak, (estimate.abs() - truth.abs()).abs() / peak
    return std, (estimate.clamp(0, 1) - truth).abs()


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float
    seconds: float


@dataclass
class Evaluation:
    method: str
    ratio: float | None
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
    ratio: float | None,
    checkpoint: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    keep_outputs: bool = False,
    progress: bool = False,
    total: int | None = None,
    options: Mapping[str, Any] | None = None,
    reconstruct: Reconstruct | None = None,
) -> Evaluation:
    """Measure, reconstruct and score each ``(name, image (1, H, W) in [0, 1])`` (MRI: also complex
    images; scored by :func:`magnitude_scores`; ``ratio``: None for operators without one).

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
            estimate = op.crop(reconstruct(y, op))
        seconds = time.perf_counter() - start
        psnr_value, ssim_value, estimate = image_scores(estimate, x, op)
        estimate = estimate.clamp(0, 1)
        result.images.append(ImageScore(name, float(psnr_value[0]), float(ssim_value[0]), seconds))
        if keep_outputs:
            result.outputs[name] = estimate[0].cpu()
    return result


# --- volumes: measured slice by slice, scored per plane ---------------------------------------------
#: the planes of a volume ``(D, C, H, W)`` = ``(z, ·, y, x)`` (:func:`idm.io.medical.read_volume`'s
#: order), each as the permutation that makes its slices the batch
PLANES: dict[str, tuple[int, int, int, int]] = {"axial": (0, 1, 2, 3), "coronal": (2, 1, 0, 3),
                                                "sagittal": (3, 1, 2, 0)}


@dataclass
class VolumeProblem:
    """A volume measured slice by slice: ``truth`` ``(D, 1, H, W)`` on [0, 1], the 2D ``op`` applied to
    every axial slice, the measurements ``y`` (one item per slice) and the file's ``affine`` (or None)."""

    truth: torch.Tensor
    op: LinearOperator
    y: torch.Tensor
    affine: Any = None


def read_scaled_volume(path: str, kind: str, *, slices: tuple[int, int] | None = None,
                       require_affine: bool = True) -> tuple[torch.Tensor, Any]:
    """``(volume (D, 1, H, W) on [0, 1], affine or None)`` of the file ``path``
    (:func:`idm.io.medical.read_volume`), its axial slices ``slices`` (``[start, stop)``, default all).

    Scale: CT (``kind`` ``ct``) in HU (values outside [0, 1]) windowed by
    :func:`idm.io.medical.hu_window`, already on [0, 1] kept; MRI (``mri``) divided by its largest
    magnitude (complex stays complex). Bad volumes (not 3D, NaN / inf, complex CT, all zero, an empty
    slice range, and with ``require_affine`` no orientation: a volume written back needs one) raise
    :class:`IDMError`."""
    from .io.medical import hu_window, read_volume

    if kind not in ("ct", "mri"):
        raise IDMError(f"a volume is measured slice by slice with the ct or mri operator, not {kind}")
    volume = read_volume(path, modality="CT" if kind == "ct" else None)
    data = volume.data
    if data.ndim != 3:
        raise IDMError(f"{path} is a {data.ndim}-D image of shape {tuple(data.shape)}, not a volume (3-D)")
    affine = volume.meta.get("affine") if volume.meta.get("oriented", True) else None
    if require_affine and affine is None:
        raise IDMError(f"{path} has no affine (voxel-to-world orientation; NIfTI: sform and qform codes are 0) to "
                       "keep on the result; set one, e.g. with nibabel's set_qform")
    if slices is not None:
        start, stop = slices
        if not 0 <= start < stop <= data.shape[0]:
            raise IDMError(f"slices {start}:{stop} are not a range within the {data.shape[0]} slices of {path}")
        data = data[start:stop]
    if not bool(torch.isfinite(data).all()):  # complex: both parts
        raise IDMError(f"{path} contains NaN or inf values")
    if kind == "ct":
        if data.is_complex():
            raise IDMError(f"{path} is complex; a CT volume is real")
        truth = hu_window(data) if float(data.min()) < 0 or float(data.max()) > 1 else data.float()
    else:
        peak = float(data.abs().max())
        if peak <= 0:
            raise IDMError(f"{path} is all zero")
        truth = data / peak
    return truth[:, None], affine


def measure_volume(truth: torch.Tensor, factory: OperatorFactory, *, seed: int = 0, affine: Any = None) -> VolumeProblem:
    """Measure every axial slice of ``truth`` (D, 1, H, W) with the one operator ``factory(size, 0)``
    (measurement noise drawn from ``seed``)."""
    op = factory(tuple(truth.shape[-2:]), 0)
    return VolumeProblem(truth, op, op.measure(truth, generator=torch.Generator().manual_seed(seed)), affine)


def volume_problem(path: str, kind: str, factory: OperatorFactory, *, seed: int = 0,
                   slices: tuple[int, int] | None = None, require_affine: bool = True) -> VolumeProblem:
    """:func:`read_scaled_volume` then :func:`measure_volume`: the volume ``path`` measured slice by slice."""
    truth, affine = read_scaled_volume(path, kind, slices=slices, require_affine=require_affine)
    return measure_volume(truth, factory, seed=seed, affine=affine)


def plane_scores(estimate: torch.Tensor, truth: torch.Tensor, with_ssim: bool = True) -> dict[str, dict[str, float]]:
    """PSNR (peak 1) and SSIM (:func:`~idm.metrics.ssim_skimage`) of a volume ``estimate`` against
    ``truth`` (both ``(D, 1, H, W)``; the estimate's magnitude if complex, clipped to [0, 1]) on the
    axial, coronal and sagittal planes: the mean over that plane's slices (slices reconstructed
    exactly, of infinite PSNR, are left out of the PSNR mean) →
    ``{plane: {"psnr": dB, "ssim": value}}`` (no ``ssim`` without ``with_ssim``, or on a plane whose
    slices are narrower than SSIM's 7 × 7 window)."""
    scored = (estimate.abs() if estimate.is_complex() else estimate).float().clamp(0, 1)
    reference = (truth.abs() if truth.is_complex() else truth).float()
    if scored.shape != reference.shape or scored.ndim != 4:
        raise IDMError(f"a volume's scores need two (D, 1, H, W) volumes, got {tuple(estimate.shape)} and "
                       f"{tuple(truth.shape)}")
    scores = {}
    for plane, order in PLANES.items():
        a, b = scored.permute(*order).contiguous(), reference.permute(*order).contiguous()
        values = psnr(a, b)
        finite = values[torch.isfinite(values)]
        scores[plane] = {"psnr": float(finite.mean()) if finite.numel() else math.inf}
        if with_ssim and min(a.shape[-2:]) >= 7:
            scores[plane]["ssim"] = float(ssim_skimage(a, b).mean())
    return scores
