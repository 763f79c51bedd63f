"""Convert scico's pre-trained DnCNN weights (Flax msgpack) into ``idm`` checkpoints.

    pip download --no-deps scico -d wheels/          # the wheel only: no jax is installed
    python -m train.convert_scico_dncnn --source wheels/scico-0.0.7-py3-none-any.whl \\
        --variant 17N --out checkpoints/dncnn-17 [--set12 DIR --bsd68 DIR]

``--source`` is a scico wheel, an unpacked scico package folder, or one ``.mpk`` file. The file
``scico/data/flax/dncnn<variant>.mpk`` is decoded with ``msgpack`` (Flax's format: arrays are
msgpack extension type 1 holding ``(shape, dtype name, C-order bytes)``), each batch norm
(running statistics, ε = 1e-5) is folded into the convolution before it, Flax's HWIO kernels
become torch's OIHW, and the result is written as :class:`idm.priors.dncnn.DnCNN` weights (fp16
by default) with a config and a model card that records the provenance, the BSD-3-Clause notice and
the denoising PSNR measured here (``--set12`` / ``--bsd68``; σ = 15, 25, 50 of 255, seed 0).

scico (https://github.com/lanl/scico) is Copyright (c) 2021-2025, Los Alamos National Laboratory,
BSD-3-Clause; the weights were trained by the scico developers following Zhang et al. (2017).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idm.errors import IDMError
from idm.priors.dncnn import DnCNN, DnCNNConfig, fold_batchnorm

VARIANTS = ("6L", "6M", "6H", "6N", "17L", "17M", "17H", "17N")
#: training noise std (on [0, 1]) of scico's blind variants
TRAIN_SIGMA = {"L": 0.06, "M": 0.10, "H": 0.20}
#: the std range scico's σ-input (N) variants were trained on
SIGMA_MAX = 0.2
MPK_PATH = "scico/data/flax/dncnn{variant}.mpk"
_NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
_NPSCALAR_EXT = 3  # flax.serialization._MsgpackExtType.npscalar

#: scico's licence, verbatim from the wheel (scico-0.0.7.dist-info/licenses/LICENSE)
SCICO_LICENSE = """\
BSD 3-Clause License

Copyright (c) 2021-2025, Los Alamos National Laboratory
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


# --- reading ---------------------------------------------------------------------------------
def read_mpk_bytes(source: str | Path, variant: str) -> tuple[bytes, str]:
    """The msgpack bytes of ``variant`` from a scico wheel, package folder or ``.mpk`` file, and
    a description of where they came from."""
    if variant not in VARIANTS:
        raise IDMError(f"unknown scico DnCNN variant {variant!r}; available: {', '.join(VARIANTS)}")
    source = Path(source)
    member = MPK_PATH.format(variant=variant)
    if not source.exists():
        raise IDMError(f"scico source {source} does not exist")
    if source.is_file() and source.suffix == ".mpk":
        return source.read_bytes(), source.name
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as wheel:
                return wheel.read(member), f"{source.name}:{member}"
        except zipfile.BadZipFile:
            raise IDMError(f"{source} is neither a scico wheel nor an .mpk file") from None
        except KeyError:
            raise IDMError(f"{source} has no {member}") from None
    for candidate in (source / member, source / member.removeprefix("scico/")):
        if candidate.is_file():
            return candidate.read_bytes(), str(candidate)
    raise IDMError(f"{source} holds no {member}")


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == _NDARRAY_EXT:
        shape, dtype, buffer = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape)
    if code == _NPSCALAR_EXT:
        dtype, buffer = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buffer, dtype=np.dtype(dtype))[0]
    raise IDMError(f"unsupported msgpack extension type {code} in the weights file")


def decode_flax_msgpack(data: bytes) -> dict[str, Any]:
    """Flax ``serialization.msgpack_restore`` without Flax: nested dicts of numpy arrays."""
    try:
        import msgpack
    except ImportError:
        raise IDMError("converting scico weights needs msgpack: pip install msgpack") from None
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except IDMError:
        raise
    except Exception as exc:  # msgpack raises several types for truncated / corrupt data
        raise IDMError(f"the weights file is truncated or not Flax msgpack ({type(exc).__name__})") from None
    if not isinstance(tree, dict) or "params" not in tree or "batch_stats" not in tree:
        raise IDMError("the weights file is not a Flax DnCNN state (no params / batch_stats)")
    return tree


# --- converting ------------------------------------------------------------------------------
def _kernel(hwio: np.ndarray) -> torch.Tensor:
    """Flax (kh, kw, in, out) → torch (out, in, kh, kw), float32."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(hwio, dtype=np.float32).transpose(3, 2, 0, 1)))


def convert_tree(tree: dict[str, Any], variant: str) -> tuple[DnCNN, dict[str, Any]]:
    """A Flax DnCNN state (:func:`decode_flax_msgpack`) → (torch :class:`DnCNN` in eval mode, notes).

    Raises :class:`IDMError` when the tree does not have the layers and shapes of ``variant``.
    """
    depth, level = int(variant[:-1]), variant[-1]
    config = DnCNNConfig(depth=depth, channels=1, features=64, sigma_input=level == "N",
                         train_sigma=TRAIN_SIGMA.get(level), sigma_max=SIGMA_MAX if level == "N" else TRAIN_SIGMA[level])
    net = DnCNN(config)
    params, stats = tree["params"], tree["batch_stats"]
    try:
        state: dict[str, torch.Tensor] = {"head.conv.weight": _kernel(params["conv_start"]["kernel"]),
                                          # N variants output (image, σ) channels; the image's is used
                                          "output_conv.weight": _kernel(params["conv_end"]["kernel"])[:1]}
        for k in range(depth - 2):
            block, bn_stats = params[f"ConvBNBlock_{k}"], stats[f"ConvBNBlock_{k}"]["BatchNorm_0"]
            kernel, bias = fold_batchnorm(
                _kernel(block["Conv_0"]["kernel"]),
                *(torch.from_numpy(np.array(v, dtype=np.float32)) for v in (
                    block["BatchNorm_0"]["scale"], block["BatchNorm_0"]["bias"], bn_stats["mean"], bn_stats["var"])),
            )
            state[f"body.{k}.conv.weight"], state[f"body.{k}.conv.bias"] = kernel, bias
        if f"ConvBNBlock_{depth - 2}" in params:
            raise KeyError(f"ConvBNBlock_{depth - 2} (more layers than variant {variant})")
        net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise IDMError(f"the weights file does not hold a DnCNN-{variant}: {message}") from None
    return net.eval(), {"variant": variant}


# --- evaluation and the card -----------------------------------------------------------------
SIGMAS_255 = (15, 25, 50)


@torch.no_grad()
def denoising_psnr(net: DnCNN, folder: str | Path, sigma_255: float, seed: int = 0) -> float:
    """Mean PSNR (peak 1) of ``net`` denoising every image of ``folder`` (gray, [0, 1]) with white
    Gaussian noise of std ``sigma_255``/255 drawn from ``seed`` (per image, in sorted order)."""
    from idm.data.images import ImageFolder
    from idm.metrics import psnr

    sigma = sigma_255 / 255.0
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _, image in ImageFolder(folder):
        x = image[None]
        z = x + sigma * torch.randn(x.shape, generator=gen)
        scores.append(float(psnr(net(z, sigma).clamp(0, 1), x)))
    return float(np.mean(scores))


def model_card(variant: str, provenance: dict[str, Any], metrics: dict[str, dict[str, float]], command: str) -> str:
    config = "σ-input (the noise std is a second input channel; trained for σ ∈ [0, 0.2] on [0, 1])" \
        if variant.endswith("N") else f"blind, trained at σ = {TRAIN_SIGMA[variant[-1]]} on [0, 1]"
    lines = [
        f"# dncnn-{variant[:-1] if variant.endswith('N') else variant} — scico's DnCNN-{variant}, converted",
        "",
        f"A {variant[:-1]}-layer DnCNN Gaussian denoiser (Zhang et al., IEEE TIP 2017), {config}, "
        "for images on [0, 1]. Not trained by us: the weights ship inside the `scico` wheel on PyPI "
        "and were converted once by `train/convert_scico_dncnn.py` (batch norms folded into the "
        "convolutions, stored as fp16). Used by `idm` as a denoiser prior (`DenoiserPrior`, "
        "`pnp`, and the IDM network's DnCNN backbone).",
        "",
        "## Provenance",
        f"- source: `{provenance['source']}` (scico {provenance.get('scico_version', '?')}), "
        f"sha256 of the .mpk `{provenance['sha256']}`",
        f"- conversion: `pip download --no-deps scico=={provenance.get('scico_version') or '0.0.7'} -d /tmp/scico`, then `{command}`",
        "- training data: not documented by scico beyond following the DnCNN paper, whose training set "
        "is BSDS images (Train400). **BSD68 may therefore be seen data; Set12 is reported first.**",
        "",
        "## Denoising PSNR measured here",
        "",
        "White Gaussian noise of std σ/255 (seed 0), PSNR on [0, 1], mean over the folder "
        "(fp16 weights loaded as float32).",
        "",
        "| data | " + " | ".join(f"σ = {s}" for s in SIGMAS_255) + " |",
        "|---|" + "---|" * len(SIGMAS_255),
    ]
    for name, row in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[str(s)]:.2f} dB" for s in SIGMAS_255) + " |")
    if not metrics:
        lines.append("| (not measured: no data folders given) |" + " |" * len(SIGMAS_255))
    lines += ["", "## Licence", "", "The weights are redistributed under scico's BSD-3-Clause licence:", "",
              "```", SCICO_LICENSE.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def convert(source: str | Path, variant: str, out: str | Path, *, folders: dict[str, str] | None = None,
            dtype: torch.dtype = torch.float16, command: str = "") -> Path:
    """Read, convert, (optionally) evaluate and write the checkpoint ``out``; returns its path."""
    from idm.io.checkpoint import save_checkpoint
    from idm.priors.denoiser import ARCHITECTURE

    data, where = read_mpk_bytes(source, variant)
    net, _ = convert_tree(decode_flax_msgpack(data), variant)
    # evaluate what is shipped: the weights rounded to the storage dtype
    stored = DnCNN(net.config)
    stored.load_state_dict({k: v.to(dtype).float() for k, v in net.state_dict().items()})
    stored.eval()
    metrics = {name: {str(s): denoising_psnr(stored, folder, s) for s in SIGMAS_255}
               for name, folder in (folders or {}).items()}
    version = Path(str(source)).name.split("-")[1] if str(source).endswith(".whl") else None
    provenance = {"source": where, "sha256": hashlib.sha256(data).hexdigest(), "scico_version": version,
                  "license": "BSD-3-Clause", "copyright": "Copyright (c) 2021-2025, Los Alamos National Laboratory"}
    config = {"architecture": ARCHITECTURE, "dncnn": net.config.to_dict(), "provenance": provenance,
              "denoising_psnr": metrics}
    return save_checkpoint(out, net.state_dict(), config, model_card(variant, provenance, metrics, command),
                           dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.convert_scico_dncnn", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="scico wheel, scico package folder or .mpk file")
    parser.add_argument("--variant", default="17N", choices=VARIANTS)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--set12", help="folder of Set12 images: measure the denoising PSNR")
    parser.add_argument("--bsd68", help="folder of BSD68 images: measure the denoising PSNR")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)
    folders = {name: path for name, path in (("Set12", args.set12), ("BSD68", args.bsd68)) if path}
    command = "python -m train.convert_scico_dncnn " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        out = convert(args.source, args.variant, args.out, folders=folders, dtype=getattr(torch, args.dtype),
                      command=command)
    except IDMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
