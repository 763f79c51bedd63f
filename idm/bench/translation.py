"""``idm bench translation``: cross-modality translation (T1 → T2) against the real paired target.

``--data`` holds co-registered slices whose names differ only in the contrast tag, set off by ``-`` or
``_`` (``brats_train_006_t1_080_w.npy`` and ``brats_train_006_t2_080_w.npy``; ``.npy`` on [0, 1] or
images; ``--pair SOURCE,TARGET``, default ``t1,t2``: the ``t2 test`` export of ``train.medical_slices``,
BraTS subjects held out of the T2 prior). Every source is translated by

* ``translate`` — LMI-guided sampling of the target prior (:func:`idm.medical.translate.sample_translation`
  with the ``--steps --start --scale --eta --init`` given; ``--init contrast`` starts from the contrast
  map below, matched to ``--reference`` when given, else to the prior's own samples — drawn once per image
  size and shared with ``contrast``; the first pair that needs them counts their seconds);
* ``sdedit`` — the same sampler without guidance, from the source itself (``scale = 0``, ``init = source``):
  the source noised to ``--sdedit-start`` and denoised in ``--sdedit-steps`` by the target prior (Meng et al.,
  ICLR 2022);
* ``unguided`` — the target prior sampled from pure noise (``start = 1``, ``scale = 0``, ``--sdedit-steps``): the floor;
* ``contrast`` — :func:`idm.medical.translate.contrast_map` alone, no sampling: of the source's tissue-class
  re-orderings, histogram-matched, the one the prior scores most likely (what ``--init contrast`` starts from);
* ``histogram`` — the source's foreground histogram matched to the pooled foreground histogram of
  ``--reference`` (a folder of target-modality training images; scikit-image ``match_histograms``;
  :func:`idm.medical.translate.histogram_match`), when given;

and scored against its real target: PSNR (peak 1), SSIM (:func:`idm.metrics.ssim_skimage`) and MI
(:func:`idm.metrics.nmi_skimage`, Studholme's normalised MI on [1, 2]), mean over the pairs::

    {"data", "pair", "prior", "reference", "seed", "options",
     "rows": [{"method", "psnr", "ssim", "mi", "seconds", "options", "images": [{"name", "psnr", "ssim", "mi"}]}]}

(``contrast`` images also carry ``choice``, the chosen class order and direction, e.g. ``"2-1-0-"``: inverted.)

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

#: the SDEdit baseline's start (fraction of T) and steps, its own settings whatever translate's: below a
#: start of ~0.2 it returns the T1 unchanged, above 0.45 it loses the anatomy (docs/translation.md)
SDEDIT = {"start": 0.45, "steps": 20}

#: the methods of the bench, in table order
TRANSLATION_METHODS = ("translate", "sdedit", "unguided", "contrast", "histogram")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..medical.translate import TRANSLATE_DEFAULTS, TRANSLATE_INITS

    parser.add_argument("--data", required=True, metavar="DIR", help="folder of paired source / target slices")
    parser.add_argument("--pair", default="t1,t2", metavar="SOURCE,TARGET",
                        help="the contrast tags of source and target file names (default t1,t2)")
    parser.add_argument("--reference", metavar="DIR", help="target-modality training images for histogram matching")
    parser.add_argument("--prior", default="prior-t2",
                        help="target-modality diffusion prior of translate, sdedit, unguided, contrast (default prior-t2)")
    parser.add_argument("--methods", nargs="+", choices=TRANSLATION_METHODS, default=list(TRANSLATION_METHODS),
                        help="methods to run (default all; histogram needs --reference)")
    for key, value in TRANSLATE_DEFAULTS.items():
        if key == "init":
            parser.add_argument("--init", choices=TRANSLATE_INITS, default=value,
                                help=f"what translate starts from (default {value}; sdedit always the source)")
        else:
            parser.add_argument(f"--{key}", type=type(value), default=value, help=f"translate / sdedit {key} (default {value:g})")
    parser.add_argument("--sdedit-start", type=float, default=SDEDIT["start"],
                        help=f"the SDEdit baseline's start as a fraction of T (default {SDEDIT['start']:g})")
    parser.add_argument("--sdedit-steps", type=int, default=SDEDIT["steps"],
                        help=f"the SDEdit baseline's sampling steps (default {SDEDIT['steps']})")
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


def run_cli(args: argparse.Namespace) -> int:
    from ..medical.translate import (TRANSLATE_DEFAULTS, contrast_map, histogram_match, reference_values,
                                     target_values, translate)
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
    reference = reference_values(args.reference) if args.reference is not None else None
    sampled = [m for m in args.methods if m != "histogram"]
    prior = load_prior(args.prior, device=args.device) if sampled else None
    options = {key: getattr(args, key) for key in TRANSLATE_DEFAULTS}
    runs = {"translate": options, "sdedit": {**options, "start": args.sdedit_start, "steps": args.sdedit_steps, "scale": 0.0,
                       "init": "source"},
            "unguided": {**options, "start": 1.0, "steps": args.sdedit_steps, "scale": 0.0, "init": "source"}}
    targets: dict[tuple[int, ...], np.ndarray] = {}

    def values_for(source: torch.Tensor) -> np.ndarray:  # --reference, else the prior's samples, once per size
        size = tuple(source.shape[-2:])
        if size not in targets:
            targets[size] = target_values(prior, reference, size, args.seed)
        return targets[size]

    rows, results = [], {}
    for method in args.methods:
        images, outputs, seconds = [], [], 0.0
        for name, source, target in pairs:
            start, extra = time.perf_counter(), {}
            if method == "histogram":
                out = histogram_match(source, reference)
            elif method == "contrast":
                mapped, chosen = contrast_map(prior, source[None].to(args.device), values_for(source), prior.schedule,
                                              size_multiple=prior.size_multiple,
                                              generator=torch.Generator().manual_seed(args.seed))
                out, extra = mapped[0].cpu(), {"choice": chosen[0]}
            else:
                values = values_for(source) if runs[method]["init"] == "contrast" else reference
                out = translate(source[None], prior, seed=args.seed, device=args.device, reference=values,
                                **runs[method])[0].cpu()
            seconds += time.perf_counter() - start
            pair = out.clamp(0, 1)[None], target[None]
            scores = {"psnr": float(psnr(*pair)[0]), "ssim": float(ssim_skimage(*pair)[0]), "mi": float(nmi_skimage(*pair)[0])}
            images.append({"name": name, **scores, **extra})
            outputs.append(out)
            print(f"  {method}: {name}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}, MI {scores['mi']:.4f}"
                  + (f" (classes {extra['choice']})" if extra else ""), flush=True)
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
