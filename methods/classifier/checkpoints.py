"""Reading trained classifier weights: torch state dicts (weights only) and BiT's ``.npz``."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from methods.backbones import read_state_dict, sha256_of  # noqa: F401  (the one weight-file reader; re-exported)
from methods.classifier.nets import BiTResNet


# ---------------------------------------------------------------------------------------------
# checkpoints

def sha256_file(path: str | Path) -> str:
    return sha256_of(path)


def resolve_checkpoint(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint file {str(p)!r} not found: place the trained model there (e.g. OpenOOD v1.5's "
            f"released checkpoints, cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt) or remove "
            f"`checkpoint` from the grid to train the classifier")
    return p


def load_state(net: nn.Module, state: dict, source: str) -> None:
    """Strict load with a readable error naming what does not match."""
    own = net.state_dict()
    shape_bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shape_bad:
        raise ValueError(
            f"{source} does not fit the network ({type(net).__name__}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shape_bad[:5]]}"
            f" — check arch, width_scale and the number of in-distribution classes")
    net.load_state_dict(state)


def load_bit_npz(net: "BiTResNet", path: str | Path) -> None:
    """BiT's released ``.npz`` weights (e.g. BiT-S-R101x1.npz) into the body of a BiT network."""
    from timm.models.resnetv2 import _load_weights

    _load_weights(net.body, str(path))


def cpu_state(net: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
