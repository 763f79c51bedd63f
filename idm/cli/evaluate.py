"""``idm eval``: PSNR/SSIM/seconds of a method on an image folder, as a table and JSON.

``--operator`` (default blockcs) and its options pick the operator; the i-th image is measured
with seed ``--seed + i``. MRI ground truths are real magnitude images in [0, 1] (image files or
2-D ``.npy``) or complex ``.npy`` arrays, scored on magnitudes normalised by the ground truth's
maximum (fastMRI; :func:`idm.evaluation.magnitude_scores`); CT ground truths are images in [0, 1]
(files or real ``.npy``). The JSON gains an ``"operator"`` entry (the first image's operator
config) for operators other than blockcs.
"""

from __future__ import annotations

import argparse


from ..data import ImageFolder
from ..data.images import IMAGE_SUFFIXES
from ..evaluation import evaluate, operator_factory
from ..registry import METHODS
from .common import (add_measurement_args, add_method_args, load_truth, method_checkpoint, method_options,
                     operator_options, write_json)


def add_parser(subparsers: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("eval", help=help_text)
    parser.add_argument("--data", required=True, help="folder of images (png, jpg, tif, bmp)")
    parser.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    parser.add_argument("--json", help="write the results as JSON to this file")
    add_method_args(parser)
    add_measurement_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    kind, operator_settings = operator_options(args)
    factory = operator_factory(kind, seed=args.seed, noise_sigma=args.noise, **operator_settings)
    ratio = operator_settings.get("ratio")
    checkpoint = method_checkpoint(args, METHODS.get(args.method))
    options = method_options(args.option)
    folder = truth_folder(args.data, args.limit, kind)
    result = evaluate(
        args.method,
        (folder[i] for i in range(len(folder))),
        factory,
        ratio=ratio,
        checkpoint=checkpoint,
        device=args.device,
        seed=args.seed,
        progress=True,
        total=len(folder),
        options=options,
    )
    settings = "".join(f", {key}={value!r}" for key, value in options.items())
    if kind == "blockcs":
        setting = f"ratio {ratio:g}"
    else:
        first = factory(tuple(folder[0][1].shape[1:]), 0).config()
        shown = {key: value for key, value in first.items() if key not in ("kind", "image_size") and value is not None}
        setting = f"operator {kind} ({', '.join(f'{key} {value}' for key, value in shown.items())})"
    print(f"method {args.method}{settings}, {setting}, {len(folder)} images from {args.data}")
    print(result.table())
    if args.json:
        payload = result.to_json()
        if checkpoint is not None:
            payload["checkpoint"] = str(checkpoint)
        if options:
            payload["options"] = options
        if kind != "blockcs":
            payload["operator"] = factory(tuple(folder[0][1].shape[1:]), 0).config()
        write_json(args.json, payload)
    return 0


class _TruthFolder(ImageFolder):
    """An image folder that also lists 2-D ``.npy`` arrays (MRI: complex allowed), for mri / ct."""

    def __init__(self, root: str, limit: int | None, kind: str) -> None:
        super().__init__(root, limit=limit, suffixes=(*IMAGE_SUFFIXES, ".npy"))
        self.kind = kind

    def __getitem__(self, index: int):
        path = self.paths[index]
        return path.stem, load_truth(path, self.kind)


def truth_folder(root: str, limit: int | None, kind: str) -> ImageFolder:
    """The ground truths of ``idm eval``: image files (and, for mri / ct, ``.npy`` arrays)."""
    return _TruthFolder(root, limit, kind) if kind in ("mri", "ct") else ImageFolder(root, limit=limit)
