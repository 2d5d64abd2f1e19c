"""Optimizer specifications of the comparison: ``kind[:key=value,...]``.

``kind`` is one of :data:`KINDS` or, from other libraries, of :data:`.peers.PEERS`
(imported only when named; see :mod:`.peers`). Every ``key=value`` is passed to the
optimizer's constructor as a keyword argument, so any argument of
:class:`scalable_shampoo.Shampoo` (or of the torch or peer optimizer) can be set without
changes here, e.g.
``shampoo:grafting=sgd,block_size=256`` or ``adamw:betas=(0.9,0.95),weight_decay=0``.
The one exception is ``lr=...``, which fixes that optimizer's learning rate instead of
sweeping it. Values are read as Python literals (int, float, tuple, quoted string),
``true``/``false``, ``none``, dtype names (``float64`` or ``torch.float64``), and
otherwise as plain strings. Each specification is validated by constructing its optimizer
once on a dummy parameter before anything trains.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from ..optimizer import Shampoo
from .peers import PEERS, load, unavailable

OptimizerFactory = Callable[..., torch.optim.Optimizer]

KINDS: dict[str, OptimizerFactory] = {
    "shampoo": Shampoo,
    "soap": Shampoo,  # the eigenvalue-corrected variant with SOAP's settings, below
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
# Hyperparameters the comparison uses unless a specification overrides them. Shampoo:
# preconditioning from step 10, roots refreshed every 20 steps (runs here are a few
# hundred steps, so the library's default of 100 would leave most of a run
# unpreconditioned). SOAP: Shampoo's eigenvalue-corrected variant with the settings of
# Vyas et al. (2024), Adam's betas (0.95, 0.95) (also the factors' EMA), bases refreshed
# every 10 steps from the first; its default Adam grafting. Both keep the library's
# block_size (1024): measured on image, SOAP's best held-out loss was 0.0108 with
# 128-blocks and 0.0042 with 1024 (Shampoo's 0.0138 and 0.0135), and the peers' SOAPs
# do not split below 2048. SGD: heavy-ball momentum, as SGD is used in practice. AdamW
# and Adagrad: torch's defaults.
COMPARISON_DEFAULTS: dict[str, dict[str, Any]] = {
    "shampoo": {"precondition_frequency": 20, "start_preconditioning_step": 10},
    "soap": {"preconditioner": "eigenvalue_corrected", "betas": (0.95, 0.95),
             "precondition_frequency": 10, "start_preconditioning_step": 1},
    "adamw": {},
    "adagrad": {},
    "sgd": {"momentum": 0.9},
    **{kind: peer.settings for kind, peer in PEERS.items()},
}
# Centre of the learning-rate grid per kind when the workload names none: Shampoo grafts
# Adam's step size by default, so it shares AdamW's centre. SOAP (ours) grafts Adam's step
# norm too; measured with a 3-point sweep its best rate was 1e-3 on lm and autoencoder.
# "rotated_adam" is the centre of SOAP without grafting (the peers' SOAPs): 3e-3, as the
# SOAP authors use. It is not a kind, only a centre that peers name.
LR_CENTERS: dict[str, float] = {"shampoo": 1e-3, "soap": 1e-3, "adamw": 1e-3, "adagrad": 1e-2,
                                "sgd": 3e-2, "rotated_adam": 3e-3}
# Every name the comparison accepts: this library's and torch's, then the peers.
ALL_KINDS: tuple[str, ...] = (*KINDS, *PEERS)
_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


class OptimizerSpecError(ValueError):
    """A malformed or invalid optimizer specification."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the comparison.

    Attributes:
        label: the specification as written (whitespace removed); names the optimizer in
            tables, plots and files.
        kind: a key of :data:`KINDS` or of :data:`.peers.PEERS`.
        overrides: the ``key=value`` pairs other than ``lr``, as parsed, in order.
        fixed_lr: the learning rate given by ``lr=...``, or None to sweep it.
    """

    label: str
    kind: str
    overrides: tuple[tuple[str, Any], ...] = ()
    fixed_lr: float | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments except ``lr``: the comparison's defaults
        for the kind, updated by the overrides."""
        return {**COMPARISON_DEFAULTS[self.kind], **dict(self.overrides)}

    @property
    def slug(self) -> str:
        """The label made safe for a file name, with a hash suffix when characters were
        replaced (so distinct labels never share files)."""
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)
        if safe == self.label:
            return safe
        return f"{safe}-{hashlib.sha256(self.label.encode()).hexdigest()[:8]}"

    def build(self, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        """Raises :class:`.peers.PeerUnavailable` for a peer whose package is missing."""
        return factory(self.kind)(params, lr=lr, **self.kwargs)

    @property
    def lr_center_key(self) -> str:
        """Whose learning-rate centre the sweep uses (a kind or a :data:`LR_CENTERS`
        key): a peer's counterpart; for ``soap``, by the scale of its step: AdamW's with
        ``grafting_momentum`` (the step takes the norm of Adam's actual step), the
        rotated Adam's without grafting, else SOAP's own."""
        if self.kind == "soap":
            if self.kwargs.get("grafting") == "none":
                return "rotated_adam"
            if self.kwargs.get("grafting_momentum"):
                return "adamw"
        return _center_key(self.kind)

    def describe(self) -> dict[str, str]:
        """The constructor's keyword arguments as strings, for reports and run keys."""
        return {key: _format_value(value) for key, value in self.kwargs.items()}


def _format_value(value: Any) -> str:
    return str(value) if isinstance(value, torch.dtype) else repr(value)


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                raise OptimizerSpecError(f"unbalanced {char!r}")
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth or quote:
        raise OptimizerSpecError("unbalanced brackets or quotes")
    parts.append("".join(current))
    return parts


def parse_value(text: str) -> Any:
    """A ``key=value`` value: literal, bool, None, dtype name or plain string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    name = text[len("torch."):] if text.startswith("torch.") else text
    if name in _DTYPE_NAMES:
        return getattr(torch, name)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        if text.startswith("torch."):
            raise OptimizerSpecError(f"unknown dtype {text!r}; accepted: "
                                     f"{', '.join('torch.' + n for n in _DTYPE_NAMES)}") from None
        return text


def parse_spec(text: str) -> OptimizerSpec:
    """Parses ``kind[:key=value,...]`` (see the module docstring).

    Raises:
        OptimizerSpecError: unknown kind, a pair without ``=`` or key, a repeated key,
            unbalanced brackets, or an ``lr`` that is not a positive number.
    """
    label = re.sub(r"\s+", "", text)
    kind, colon, options = label.partition(":")
    if kind not in ALL_KINDS:
        raise OptimizerSpecError(f"unknown optimizer {kind!r} in {text!r}; known: "
                                 f"{', '.join(ALL_KINDS)}")
    if colon and not options:
        raise OptimizerSpecError(f"optimizer {text!r}: nothing after ':' (expected "
                                 "key=value pairs separated by commas)")
    overrides: dict[str, Any] = {}
    fixed_lr = None
    try:
        pairs = _split_top_level(options) if options else []
    except OptimizerSpecError as error:
        raise OptimizerSpecError(f"optimizer {text!r}: {error}") from None
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.isidentifier() or not value:
            raise OptimizerSpecError(f"optimizer {text!r}: malformed override {pair!r} "
                                     "(expected key=value)")
        if key in overrides or (key == "lr" and fixed_lr is not None):
            raise OptimizerSpecError(f"optimizer {text!r}: {key!r} given twice")
        try:
            parsed = parse_value(value)
        except OptimizerSpecError as error:
            raise OptimizerSpecError(f"optimizer {text!r}: {key}: {error}") from None
        if key == "lr":
            if (isinstance(parsed, bool) or not isinstance(parsed, (int, float))
                    or not math.isfinite(parsed) or parsed <= 0):
                raise OptimizerSpecError(f"optimizer {text!r}: lr must be a positive number, "
                                         f"got {value!r}")
            fixed_lr = float(parsed)
        else:
            overrides[key] = parsed
    return OptimizerSpec(label, kind, tuple(overrides.items()), fixed_lr)


def validate(spec: OptimizerSpec) -> None:
    """Constructs the optimizer once on a dummy matrix and vector parameter.

    Raises:
        OptimizerSpecError: an override that the constructor does not name (checked
            first: some peers ignore unknown keywords), or the constructor rejected the
            arguments; the message names the specification and, for an unknown keyword,
            the accepted ones.
        PeerUnavailable: a peer whose package is missing (an ``ImportError``).
    """
    accepted = accepted_arguments(spec.kind)
    unknown = [key for key, _ in spec.overrides if key not in accepted]
    if unknown:
        raise OptimizerSpecError(f"optimizer {spec.label!r}: unknown argument(s) "
                                 f"{', '.join(unknown)}; {spec.kind} accepts "
                                 f"{', '.join(sorted(accepted))}")
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))]
    try:
        spec.build(params, spec.fixed_lr or spec_lr_center(spec, {}))
    except (TypeError, ValueError) as error:
        raise OptimizerSpecError(f"optimizer {spec.label!r}: {error}") from None


def split_available(specs: Iterable[OptimizerSpec]) -> tuple[list[OptimizerSpec], list[str]]:
    """The specifications that can be built, in order, and one line per peer whose
    package is missing (naming it and the install command)."""
    kept, skipped = [], []
    for spec in specs:
        reason = unavailable(spec.kind) if spec.kind in PEERS else None
        if reason is None:
            kept.append(spec)
        else:
            skipped.append(f"skipping {spec.label!r}: {reason}")
    return kept, skipped


def factory(kind: str) -> OptimizerFactory:
    """The constructor of ``kind``; a peer's is imported here.

    Raises:
        PeerUnavailable: a peer whose package is missing.
    """
    return KINDS[kind] if kind in KINDS else load(kind)


def _center_key(kind: str) -> str:
    """The :data:`LR_CENTERS` key of ``kind`` at its defaults: a peer's counterpart's."""
    return PEERS[kind].lr_center if kind in PEERS else kind


def lr_center(kind: str, workload_centers: dict[str, float]) -> float:
    """Centre of the learning-rate grid: the workload's for the kind, else
    :data:`LR_CENTERS`; a peer uses those of the kind named by its ``lr_center``."""
    key = _center_key(kind)
    return workload_centers.get(key, LR_CENTERS[key])


def spec_lr_center(spec: OptimizerSpec, workload_centers: dict[str, float]) -> float:
    """Centre of the learning-rate grid of ``spec``: that of its
    :attr:`~OptimizerSpec.lr_center_key`, the workload's if it names one."""
    key = spec.lr_center_key
    return workload_centers.get(key, LR_CENTERS[key])


def accepted_arguments(kind: str) -> set[str]:
    """Named keyword arguments of the kind's constructor other than params and lr."""
    parameters = inspect.signature(factory(kind)).parameters
    return {name for name, p in parameters.items()
            if name not in ("self", "params", "lr")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def lr_grid(center: float, points: int) -> list[float]:
    """``points`` consecutive values of the half-decade ladder ``{1, 3} x 10^k`` around the
    ladder value nearest ``center`` (for an even count the extra point is above)."""
    if points < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    if not (math.isfinite(center) and center > 0):
        raise ValueError(f"center must be a positive number, got {center}")
    # Ladder index i <-> 10^(i // 2) * (1 if i even else 3); nearest in log space.
    decade = 2 * math.floor(math.log10(center))
    index = min(range(decade - 2, decade + 4), key=lambda i: abs(math.log(_ladder(i) / center)))
    first = index - (points - 1) // 2
    return [_ladder(i) for i in range(first, first + points)]


def _ladder(index: int) -> float:
    return float(f"{(1 if index % 2 == 0 else 3)}e{index // 2}")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors: Shampoo's own count
    (``metrics()["state_bytes"]``), else the bytes of the storages of the tensors found
    in ``optimizer.state`` (inside nested dicts, lists, tuples, sets and the attributes
    of objects, as peers keep them), each storage counted once."""
    if isinstance(optimizer, Shampoo):
        return int(optimizer.metrics()["state_bytes"])
    # The parameters' own storages are not state, should an object in the state hold one.
    params = {p.untyped_storage().data_ptr() for group in optimizer.param_groups
              for p in group["params"]}
    storages = {storage.data_ptr(): storage.nbytes()
                for storage in (t.untyped_storage() for t in _tensors(optimizer.state, set()))}
    return sum(size for pointer, size in storages.items() if pointer not in params)


def _tensors(value: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _tensors(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for item in vars(value).values():
            yield from _tensors(item, seen)
