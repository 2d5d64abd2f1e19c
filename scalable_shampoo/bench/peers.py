"""Optimizers of other libraries in the comparison ("peers"), from the ``peers`` extra.

A peer is imported only when a comparison names it; a peer whose package is missing is
reported by :func:`unavailable` (the comparison skips it and runs the rest). Each peer is
built with its library's documented defaults except the comparison's shared settings
(:attr:`Peer.settings`): the learning rate (swept), and where the peer has the
argument, the betas, weight decay and preconditioner refresh interval of the comparison's
counterpart (``soap`` for the SOAP peers, ``shampoo`` for Shampoo).

heavyball compiles parts of its step with ``torch.compile`` unless its module-level
``heavyball.utils.compile_mode`` is None. Its peers run eagerly: their ``step`` sets
that variable to None for the duration of the call and restores it after, so the
process's other heavyball optimizers are not changed. Importing heavyball 3.2 or
pytorch-optimizer 4.1 changes no torch settings (matmul precision, cuDNN, determinism,
opt_einsum, compiler configs); ``tests/test_bench_peers.py`` checks that.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

PEERS_EXTRA_HINT_TEMPLATE = ("pip install 'scalable-shampoo[peers]' torch=={torch} (in a "
                             "checkout: pip install -e \".[peers]\" torch=={torch})")


def peers_extra_hint() -> str:
    """The install command of the peers extra, with the running torch pinned so that pip
    never resolves torch on its own."""
    return PEERS_EXTRA_HINT_TEMPLATE.format(torch=torch.__version__.split("+")[0])


@dataclass(frozen=True)
class Peer:
    """One optimizer of another library.

    Attributes:
        package: the distribution to install (as pip names it).
        module: the module that defines the optimizer class.
        attribute: the class's name in ``module``.
        settings: the comparison's shared settings for it (constructor keyword arguments,
            lr excluded); everything else is the library's default.
        lr_center: the kind (or ``LR_CENTERS`` key) of this library whose learning-rate
            centre the sweep uses (``Workload.lr_centers`` and ``LR_CENTERS``), chosen by
            the scale of the peer's update at its defaults.
        eager: run ``step`` with heavyball's compilation off (see the module doc).
        summary: one line for ``--help`` and the README.
    """

    package: str
    module: str
    attribute: str
    settings: dict[str, Any] = field(default_factory=dict)
    lr_center: str = "adamw"
    eager: bool = False
    summary: str = ""


# The comparison's SOAP and Shampoo settings (COMPARISON_DEFAULTS in .optimizers), given
# under each library's argument names.
_SOAP = {"betas": (0.95, 0.95), "precondition_frequency": 10, "weight_decay": 0.0}
PEERS: dict[str, Peer] = {
    "pto-soap": Peer(
        "pytorch-optimizer", "pytorch_optimizer", "SOAP", dict(_SOAP),
        lr_center="rotated_adam",
        summary="pytorch-optimizer's SOAP"),
    "pto-scalable-shampoo": Peer(
        "pytorch-optimizer", "pytorch_optimizer", "ScalableShampoo",
        {"preconditioning_compute_steps": 20, "start_preconditioning_step": 10},
        # Its default grafting is SGD's: the step has SGD's size.
        lr_center="sgd",
        summary="pytorch-optimizer's port of Google's Shampoo, SGD grafting"),
    "heavyball-soap": Peer(
        "heavyball", "heavyball", "SOAP", {**_SOAP, "shampoo_beta": 0.95},
        lr_center="rotated_adam",
        eager=True, summary="heavyball's SOAP, eager"),
    "heavyball-psgdkron": Peer(
        "heavyball", "heavyball", "PSGDKron", {}, lr_center="adamw", eager=True,
        summary="heavyball's PSGD with Kronecker factors, eager"),
}


class PeerUnavailable(ImportError):
    """A peer's package is not installed or cannot be imported."""


def unavailable(kind: str) -> str | None:
    """None if the peer ``kind`` can be built, else one line saying why not and how to
    install it."""
    try:
        load(kind)
    except PeerUnavailable as error:
        return str(error)
    return None


def load(kind: str) -> Callable[..., torch.optim.Optimizer]:
    """The peer's optimizer class (for a heavyball peer, an eager subclass).

    Raises:
        PeerUnavailable: its package is missing or failed to import.
    """
    peer = PEERS[kind]
    try:
        module = importlib.import_module(peer.module)
        cls = getattr(module, peer.attribute)
    except ImportError as error:
        top = peer.module.split(".")[0]
        missing = isinstance(error, ModuleNotFoundError) and (error.name or "") == top
        reason = ("is not installed" if missing
                  else f"failed to import ({type(error).__name__}: {error})")
        raise PeerUnavailable(f"optimizer {kind!r} needs {peer.package}, which {reason}; "
                              f"it is part of the peers extra: {peers_extra_hint()}") from None
    except AttributeError:
        raise PeerUnavailable(f"optimizer {kind!r}: {peer.module} has no {peer.attribute} "
                              f"(an unsupported {peer.package} version); "
                              f"{peers_extra_hint()}") from None
    return _eager_subclass(cls) if peer.eager else cls


@contextmanager
def heavyball_eager() -> Iterator[None]:
    """heavyball's compilation off inside the block, restored after."""
    utils = importlib.import_module("heavyball.utils")
    previous = utils.compile_mode
    utils.compile_mode = None
    try:
        yield
    finally:
        utils.compile_mode = previous


@functools.lru_cache(maxsize=None)
def _eager_subclass(cls: type) -> type:
    """``cls`` whose constructor and ``step`` run under :func:`heavyball_eager`; the
    constructor's signature is the class's (for argument checks)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with heavyball_eager():
            cls.__init__(self, *args, **kwargs)

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        with heavyball_eager():
            return cls.step(self, *args, **kwargs)

    __init__.__signature__ = inspect.signature(cls.__init__)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"__init__": __init__, "step": step,
                                        "__module__": __name__,
                                        "__qualname__": cls.__qualname__})

