"""``idm bench translation``: cross-modality translation (T1 → T2) against the real paired target.

``--data`` holds co-registered slices whose names differ only in the contrast tag, set off by ``-`` or
``_`` (``brats_train_006_t1_080_w.npy`` and ``brats_train_006_t2_080_w.npy``; ``.npy`` on [0, 1] or
images; ``--pair SOURCE,TARGET``, default ``t1,t2``: the ``t2 test`` export of ``train.medical_slices``,
BraTS subjects held out of the T2 prior). Every source is translated by

* ``translate`` — LMI-guided sampling of the target prior (:func:`idm.medical.translate.sample_translation`
  with the ``--steps --start --scale --eta`` given);
* ``sdedit`` — the same run without guidance (``scale = 0``): the source noised to ``--start`` and
  denoised by the target prior (Meng et al., ICLR 2022);
* ``unguided`` — the target prior sampled from pure noise (``start = 1``, ``scale = 0``): the floor;
* ``histogram`` — the source's foreground histogram matched to the pooled foreground histogram of
  ``--reference`` (a folder of target-modality training images; scikit-image ``match_histograms``;
  :func:`histogram_match`), when given;

and scored against its real target: PSNR (peak 1), SSIM (:func:`idm.metrics.ssim_skimage`) and MI
(:func:`idm.metrics.nmi_skimage`, Studholme's normalised MI on [1, 2]), mean over the pairs::

    {"data", "pair", "prior", "reference", "seed", "options",
     "rows": [{"method", "psnr", "ssim", "mi", "seconds", "options", "images": [{"name", "psnr", "ssim", "mi"}]}]}

``--figure``: source, target and every method's result for each pair.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import IDMError
from ..io.atomic import save_figure

#: the methods of the bench, in table order
TRANSLATION_METHODS = ("translate", "sdedit", "unguided", "histogram")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..medical.translate import TRANSLATE_DEFAULTS

    parser.add_argument("--data", required=True, metavar="DIR", help="folder of paired source / target slices")
    parser.add_argument("--pair", default="t1,t2", metavar="SOURCE,TARGET",
                        help="the contrast tags of source and target file names (default t1,t2)")
    parser.add_argument("--reference", metavar="DIR", help="target-modality training images for histogram matching")
    parser.add_argument("--prior", help="target-modality diffusion prior (needed by translate, sdedit, unguided)")
    parser.add_argument("--methods", nargs="+", choices=TRANSLATION_METHODS, default=list(TRANSLATION_METHODS),
                        help="methods to run (default all; histogram needs --reference)")
    for key, value in TRANSLATE_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, help=f"translate / sdedit {key} (default {value:g})")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N pairs (sorted by name)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every sampler (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--figure", metavar="FILE.png", help="source, target and each method per pair")


def read_pairs(folder: str | Path, source_tag: str, target_tag: str, limit: int | None = None
               ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, source (1, H, W), target (1, H, W))`` of every file whose name holds ``source_tag`` set off
    by ``-`` / ``_`` and has a partner with ``target_tag`` in its place; sorted by name, the first
    ``limit``; ``name`` is the source file's stem."""
    from ..cli.common import read_slice

    root = Path(folder)
    if not root.is_dir():
        raise IDMError(f"data folder not found: {root}")
    pattern = re.compile(rf"(?<=[-_]){re.escape(source_tag)}(?=[-_])")
    pairs = []
    sources = sorted(p for p in root.iterdir() if p.is_file() and pattern.search(p.name))
    for path in sources[:limit] if limit is not None else sources:
        partner = path.with_name(pattern.sub(target_tag, path.name, count=1))
        if not partner.is_file():
            raise IDMError(f"{path.name} has no {target_tag} partner {partner.name} in {root}")
        source, target = read_slice(path, "source"), read_slice(partner, "target")
        if source.shape != target.shape:
            raise IDMError(f"{path.name} is {tuple(source.shape[1:])}, its partner {tuple(target.shape[1:])}")
        pairs.append((path.name.split(".")[0], source, target))
    if not pairs:
        raise IDMError(f"no files tagged {source_tag} with {target_tag} partners in {root}")
    return pairs


def reference_values(folder: str | Path) -> np.ndarray:
    """Every pixel of the images in ``folder`` (:func:`idm.data.load_image`, gray [0, 1]) as one 1-D array."""
    from ..data import load_image
    from ..data.images import IMAGE_SUFFIXES

    root = Path(folder)
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not files:
        raise IDMError(f"no reference images in {root}")
    return np.concatenate([load_image(p).numpy().ravel() for p in files])


def histogram_match(source: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
    """``source`` with the histogram of ``reference`` over the foreground (scikit-image ``match_histograms``
    of the source's non-zero pixels to the reference's non-zero pixels; zero background stays zero, so a
    skull-stripped scan is not matched to the background share of another data set)."""
    from skimage.exposure import match_histograms

    image = source.numpy()
    out = np.zeros_like(image, dtype=np.float32)
    foreground, values = image > 0, reference[reference > 0]
    if foreground.any() and values.size:
        out[foreground] = match_histograms(image[foreground], values)
    return torch.from_numpy(out)


def run_cli(args: argparse.Namespace) -> int:
    from ..medical.translate import TRANSLATE_DEFAULTS, translate
    from ..metrics import nmi_skimage, psnr, ssim_skimage
    from ..priors.prior import load_prior

    tags = args.pair.split(",")
    if len(tags) != 2 or not all(tags) or tags[0] == tags[1]:
        raise IDMError(f"--pair takes two different tags SOURCE,TARGET, got {args.pair!r}")
    if "histogram" in args.methods and args.reference is None:
        raise IDMError("histogram matching needs --reference DIR (target-modality training images), "
                       "or leave it out of --methods")
    if args.limit is not None and args.limit < 1:
        raise IDMError(f"--limit must be >= 1, got {args.limit}")
    pairs = read_pairs(args.data, *tags, limit=args.limit)
    reference = reference_values(args.reference) if "histogram" in args.methods else None
    sampled = [m for m in args.methods if m != "histogram"]
    if sampled and args.prior is None:
        raise IDMError(f"{', '.join(sampled)} sample a target-modality prior: give --prior DIR")
    prior = load_prior(args.prior, device=args.device) if sampled else None
    options = {key: getattr(args, key) for key in TRANSLATE_DEFAULTS}
    runs = {"translate": options, "sdedit": {**options, "scale": 0.0},
            "unguided": {**options, "start": 1.0, "scale": 0.0}}
    rows, results = [], {}
    for method in args.methods:
        images, outputs, seconds = [], [], 0.0
        for name, source, target in pairs:
            start = time.perf_counter()
            if method == "histogram":
                out = histogram_match(source, reference)
            else:
                out = translate(source[None], prior, seed=args.seed, device=args.device, **runs[method])[0].cpu()
            seconds += time.perf_counter() - start
            pair = out.clamp(0, 1)[None], target[None]
            scores = {"psnr": float(psnr(*pair)[0]), "ssim": float(ssim_skimage(*pair)[0]), "mi": float(nmi_skimage(*pair)[0])}
            images.append({"name": name, **scores})
            outputs.append(out)
            print(f"  {method}: {name}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}, MI {scores['mi']:.4f}",
                  flush=True)
        mean = {key: float(np.mean([image[key] for image in images])) for key in ("psnr", "ssim", "mi")}
        rows.append({"method": method, **mean, "seconds": seconds / len(pairs), "images": images,
                     "options": runs.get(method, {})})
        results[method] = outputs
    print(table(rows))
    if args.json:
        from ..cli.common import write_json

        write_json(args.json, {"data": str(args.data), "pair": tags, "prior": str(args.prior),
                               "reference": args.reference, "seed": args.seed, "options": options, "rows": rows})
    if args.figure:
        write_figure(args.figure, pairs, results, rows)
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<10}  {'PSNR':>6}  {'SSIM':>6}  {'MI':>6}  {'s/image':>7}"]
    lines += [f"{r['method']:<10}  {r['psnr']:6.2f}  {r['ssim']:6.4f}  {r['mi']:6.4f}  {r['seconds']:7.1f}" for r in rows]
    return "\n".join(lines)


def write_figure(path: str | Path, pairs: list, results: dict[str, list[torch.Tensor]], rows: list[dict[str, Any]]) -> None:
    """One row per pair: source, target, then each method (with its PSNR / SSIM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source", "target", *results]
    fig, axes = plt.subplots(len(pairs), len(columns), figsize=(1.6 * len(columns), 2.6 * len(pairs)), squeeze=False)
    scores = {r["method"]: r["images"] for r in rows}
    for i, (name, source, target) in enumerate(pairs):
        images = [source, target, *(results[m][i] for m in results)]
        for j, (column, image) in enumerate(zip(columns, images)):
            ax = axes[i][j]
            ax.imshow(image[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(column, fontsize=8)
            if column in scores:
                ax.set_xlabel(f"{scores[column][i]['psnr']:.1f} dB / {scores[column][i]['ssim']:.3f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    save_figure(fig, path, dpi=80)
