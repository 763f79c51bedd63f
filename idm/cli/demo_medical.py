"""``idm demo --medical``: the medical counterpart of ``idm demo``, on the real sample data of
``--data-root`` (default ``../shared/data``, the project's shared data folder; see its README).

Cases (the names ``--cases`` takes):

* ``knee-4x``, ``knee-8x``: four fastMRI knee slices, 320 × 320: the magnitude images
  ``mri/fastmri_knee_scoremri/real/retrospective/00{1,2,3}.npy`` and the complex image
  ``mri/fastmri_knee_scoremri/single-coil/001.npy`` (the ground truth stays complex), each divided by
  its max ``|x|``; single-coil Cartesian MRI, random 1D mask at 4× / 8× (image i: seed ``--seed`` + i,
  as ``idm eval``). Methods ``pinv`` (zero-filled), ``tv``, ``pnp``, ``idm``.
* ``ct-23v``, ``ct-90deg``: the held-out axial slice z = 56 (101 × 122, 3 mm) of
  ``ct/totalsegmentator/example_ct.nii.gz``, HU windowed [−1000, 1000] → [0, 1]; parallel-beam CT
  with 23 views over [0°, 180°) (sparse view) or 60 views over [0°, 90°) (limited angle). Methods
  ``fbp``, ``tv``, ``pnp``, ``idm``. Figures show the slice flipped to the radiological view (anterior up).
* ``brain-8coil``: the real 8-coil brain k-space ``mri/kspace_loraks_espirit/ESPIRiT_data/brain_alias_8ch.mat``
  (320 × 256) with the operator of ``idm reconstruct --kspace`` (the file's own mask, ESPIRiT
  sensitivities), the k-space divided by the CG-SENSE image's max magnitude (results on [0, 1]). No
  ground truth: seconds only. Methods ``pinv`` (CG-SENSE), ``tv``, ``pnp``, ``idm``.

``--methods`` replaces every case's methods; one that does not apply to a case's operator (``fbp``:
CT only) is skipped there with a note. ``idm`` uses the shipped ``idm-mri`` / ``idm-ct`` checkpoint,
``pnp`` the shipped denoiser ``prior-mri`` / ``prior-ct`` (:data:`SHIPPED`; searched as
:func:`idm.io.checkpoint.resolve_checkpoint` does, ``$IDM_CHECKPOINT_DIR`` first); a missing one
skips the method with a note unless ``--methods`` names it.

Scores as :mod:`idm.evaluation`: MRI on magnitudes divided by the ground truth's maximum (fastMRI),
CT on the [0, 1] windowed images, PSNR peak 1, SSIM of scikit-image. Output ``-o``: the table on
stdout, ``results.json`` (per-image scores of every case and method; ``null`` PSNR / SSIM without
ground truth) and ``<case>.png`` (rows: each image and its error map ``|x̂ − x|`` on a fixed scale).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bench.methods import MethodChoice, build_method
from ..errors import IDMError
from ..evaluation import Evaluation, ImageScore, evaluate, operator_factory
from ..io.atomic import save_figure
from ..network.method import OPERATOR_CHECKPOINTS
from ..zeroshot.pnp import OPERATOR_DENOISERS
from ..registry import METHODS
from .common import write_json

DEFAULT_DATA_ROOT = "../shared/data"
KNEE_FILES = tuple(f"mri/fastmri_knee_scoremri/{f}" for f in (
    "real/retrospective/001.npy", "real/retrospective/002.npy", "real/retrospective/003.npy", "single-coil/001.npy"))
CT_FILE, CT_SLICE = "ct/totalsegmentator/example_ct.nii.gz", 56
BRAIN_FILE = "mri/kspace_loraks_espirit/ESPIRiT_data/brain_alias_8ch.mat"
#: methods that apply to some operator kinds only (the others are run on every case)
ONLY_FOR = {"fbp": ("ct",)}
#: method → the shipped checkpoint it uses for each operator kind
SHIPPED = {"idm": OPERATOR_CHECKPOINTS, "pnp": OPERATOR_DENOISERS}


@dataclass(frozen=True)
class Case:
    """A demo case: operator ``kind``, the ``files`` it reads (relative to the data root), the
    :func:`operator_factory` ``options`` (empty: raw k-space, no ground truth), default ``methods``
    and the error maps' colour scale ``[0, error_max]``."""

    name: str
    title: str
    kind: str
    files: tuple[str, ...]
    methods: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    error_max: float = 0.2


CASES = {c.name: c for c in (
    Case("knee-4x", "knee MRI, single coil, 4×, random mask", "mri", KNEE_FILES, ("pinv", "tv", "pnp", "idm"),
         {"acceleration": 4.0, "mask_type": "random"}),
    Case("knee-8x", "knee MRI, single coil, 8×, random mask", "mri", KNEE_FILES, ("pinv", "tv", "pnp", "idm"),
         {"acceleration": 8.0, "mask_type": "random"}),
    Case("ct-23v", f"CT slice z={CT_SLICE}, 23 views over 180°", "ct", (CT_FILE,), ("fbp", "tv", "pnp", "idm"), {"views": 23}),
    Case("ct-90deg", f"CT slice z={CT_SLICE}, 60 views over 90° (limited angle)", "ct", (CT_FILE,), ("fbp", "tv", "pnp", "idm"),
         {"views": 60, "angle_range": (0.0, 90.0)}),
    Case("brain-8coil", "real 8-coil brain k-space (its own mask, ESPIRiT maps), no ground truth", "mri",
         (BRAIN_FILE,), ("pinv", "tv", "pnp", "idm")),
)}


def run_medical(args: argparse.Namespace) -> int:
    root = Path(args.data_root or DEFAULT_DATA_ROOT)
    cases = [CASES[name] for name in dict.fromkeys(args.cases or CASES)]
    for path in [root] + [root / f for case in cases for f in case.files]:
        if not path.exists():
            raise IDMError(f"medical sample data not found: {path} is missing (--data-root DIR: the folder holding "
                           f"the mri/ and ct/ sample data, default {DEFAULT_DATA_ROOT})")
    explicit = list(dict.fromkeys(args.methods or []))
    for name in explicit:
        METHODS.get(name)  # unknown method → one-line error before any work
    plan, built = [], {}
    for case in cases:
        runs = []
        for name in explicit or case.methods:
            if case.kind not in ONLY_FOR.get(name, (case.kind,)):
                print(f"note: skipping {name} on {case.name}: it applies to {' / '.join(ONLY_FOR[name])} only")
                continue
            if (name, case.kind) not in built:  # idm, pnp: the shipped checkpoint of the operator kind, loaded now
                checkpoint = SHIPPED.get(name, {}).get(case.kind)
                choice = MethodChoice(name, checkpoint=checkpoint, explicit=bool(explicit))
                built[name, case.kind] = build_method(choice, device=args.device, seed=args.seed, ratio=None)
            if built[name, case.kind] is not None:
                runs.append((name, built[name, case.kind]))
        plan.append((case, runs))
    if not any(runs for _, runs in plan):
        raise IDMError(f"nothing to run: none of the methods {' '.join(explicit)} applies to the cases "
                       f"{' '.join(c.name for c in cases)}")
    out = Path(args.output or "idm-demo-medical")
    loaded: dict[str, Any] = {}
    results = []
    for case, runs in plan:
        if not runs:
            continue
        start = time.perf_counter()
        if case.options:
            images = loaded.setdefault(case.files[0], load_images(root, case))
            factory = operator_factory(case.kind, seed=args.seed, **case.options)
            evaluations = [evaluate(name, images.items(), factory, ratio=None, device=args.device, seed=args.seed,
                                    keep_outputs=True, progress=True, total=len(images), reconstruct=reconstruct)
                           for name, reconstruct in runs]
            operator = {"kind": case.kind, **case.options, "seed": args.seed}
        else:
            images, evaluations, operator = raw_kspace_runs(root / BRAIN_FILE, runs, args.device)
        write_figure(out / f"{case.name}.png", case, images, evaluations)
        seconds = time.perf_counter() - start
        print(f"{case.name}: {len(images)} image(s), {len(evaluations)} method(s), {seconds:.1f} s", file=sys.stderr)
        results.append((case, operator, list(images), evaluations))
    print(summary_table(results))
    write_json(out / "results.json", {
        "data_root": str(root), "seed": args.seed,
        "cases": [{"case": case.name, "title": case.title, "operator": operator, "images": names,
                   "runs": [{"method": e.method, "images": [asdict(s) for s in e.images], "mean": mean(e)}
                            for e in evaluations]}
                  for case, operator, names, evaluations in results]})
    print(f"figures and results.json written to {out}/")
    return 0


def load_images(root: Path, case: Case) -> dict[str, torch.Tensor]:
    """The ground truths ``name → (1, H, W)``: knee MRI float32 / complex64 with max ``|x|`` = 1, CT
    float32 in [0, 1] (windowed HU)."""
    import numpy as np

    if case.kind == "ct":
        from ..io.medical import hu_window, read_volume

        volume = read_volume(root / CT_FILE, modality="CT")
        return {f"slice{CT_SLICE:03d}": hu_window(volume.data[CT_SLICE]).float()[None]}
    images = {}
    for relative in case.files:
        x = torch.from_numpy(np.load(root / relative))
        x = (x.to(torch.complex64) if x.is_complex() else x.float()) / x.abs().max().item()
        kind = "singlecoil" if "single-coil" in relative else "retro"
        images[f"knee-{kind}-{Path(relative).stem}"] = x[None]
    return images


def raw_kspace_runs(path: Path, runs: list, device: str):
    """Reconstruct the raw k-space with each ``(name, reconstruct)``: ``({name: None}, evaluations
    with magnitudes (1, H, W) clipped to [0, 1] and PSNR / SSIM None, operator config)``."""
    from .reconstruct import kspace_problem

    options = dict(kspace=str(path), key=None, slice=None, shift=False, coils=None, sensitivities=None)
    op, y, names = kspace_problem(argparse.Namespace(**options))
    scale = op.A_dagger(y).abs().max().item()  # the CG-SENSE image's max magnitude → 1
    y = y / scale
    evaluations = []
    for name, reconstruct in runs:
        start = time.perf_counter()
        with torch.no_grad():
            x = op.crop(reconstruct(y.to(device), op)).cpu()
        seconds = time.perf_counter() - start
        evaluation = Evaluation(name, None, [ImageScore(names[0], None, None, seconds)])  # type: ignore[arg-type]
        evaluation.outputs[names[0]] = x.abs()[0].clamp(0, 1)
        evaluations.append(evaluation)
    return {names[0]: None}, evaluations, {**op.config(), "kspace": str(path), "scale": 1 / scale}


def mean(evaluation: Evaluation) -> dict[str, float | None]:
    """Mean PSNR / SSIM / seconds over the images (None for scores without ground truth)."""
    values = {key: [getattr(s, key) for s in evaluation.images] for key in ("psnr", "ssim", "seconds")}
    return {key: None if None in v else sum(v) / len(v) for key, v in values.items()}


def summary_table(results: list) -> str:
    width = max(len("case"), *(len(case.name) for case, *_ in results))
    lines = [f"{'case':<{width}}  {'method':<8}  {'PSNR':>7}  {'SSIM':>6}  {'s/slice':>8}"]
    for case, _, _, evaluations in results:
        for e in evaluations:
            m = mean(e)
            psnr = "—" if m["psnr"] is None else f"{m['psnr']:.2f}"
            ssim = "—" if m["ssim"] is None else f"{m['ssim']:.4f}"
            lines.append(f"{case.name:<{width}}  {e.method:<8}  {psnr:>7}  {ssim:>6}  {m['seconds']:8.3f}")
    return "\n".join(lines)


def write_figure(path: Path, case: Case, images: dict, evaluations: list[Evaluation]) -> None:
    """Columns: the ground truth (if any), then each method. Per image a row of magnitudes on [0, 1]
    with PSNR / SSIM (or seconds) captions and, with a ground truth, a row of error maps
    ``|x̂ − x|`` on ``[0, case.error_max]``. CT is shown in the radiological view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth_col = next(iter(images.values())) is not None
    rows_per_image = 2 if truth_col else 1
    cols = truth_col + len(evaluations)
    first = next(iter(evaluations[0].outputs.values()))
    height, width = first.shape[-2:]
    side = 1.9
    fig, axes = plt.subplots(rows_per_image * len(images), cols, squeeze=False,
                             figsize=(side * cols, rows_per_image * len(images) * (side * height / width + 0.3)))

    def show(ax, image, title="", caption="", **style):
        image = image[0].flip(0, 1) if case.kind == "ct" else image[0]
        shown = ax.imshow(image.numpy(), **({"cmap": "gray", "vmin": 0, "vmax": 1} | style))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(caption, fontsize=8)
        return shown

    for index, (name, truth) in enumerate(images.items()):
        row = rows_per_image * index
        if truth_col:
            show(axes[row][0], truth.abs(), "ground truth" if index == 0 else "", name)
        for col, e in enumerate(evaluations, start=int(truth_col)):
            score, estimate = next(s for s in e.images if s.name == name), e.outputs[name]
            caption = (f"{score.seconds:.2f} s" if score.psnr is None
                       else f"{score.psnr:.2f} dB / {score.ssim:.3f}")
            show(axes[row][col], estimate, e.method if index == 0 else "", caption)
            if truth_col:
                errors = show(axes[row + 1][col], (estimate - truth.abs()).abs(), cmap="inferno", vmax=case.error_max)
        if truth_col:  # the error maps' colour bar (first image) or their label, in the ground truth column
            ax = axes[row + 1][0]
            ax.axis("off")
            if index == 0:
                fig.colorbar(errors, cax=ax.inset_axes([0.55, 0.05, 0.1, 0.9])).ax.tick_params(labelsize=7)
            ax.text(0.4 if index == 0 else 0.5, 0.5, "|x̂ − x|", rotation=90, ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
    fig.suptitle(case.title, fontsize=10)
    save_figure(fig, path, dpi=100, rect=(0, 0, 1, 1 - 0.15 / fig.get_figheight()))  # room for the title
