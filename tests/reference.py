"""An independent float64 implementation of SPEC section 2, for tests only.

Written for clarity, not speed: blocks are cut with explicit index ranges, factors are
accumulated with ``einsum``, roots come from ``eigh`` in float64 and the preconditioned
direction is an explicit Kronecker product applied to the row-major ``vec`` of the
block, ``vec(B x_1 Q_1 ... x_k Q_k) = (Q_1 kron ... kron Q_k) vec(B)``.
"""

from __future__ import annotations

import itertools
import math
import string
from dataclasses import dataclass, field

import torch


def reference_root(matrix: torch.Tensor, exponent: float, epsilon: float,
                   relative: bool = False) -> torch.Tensor:
    """``(A + r I)^(-exponent)``, ``r = epsilon * lambda_max`` (1 for a zero matrix) if
    ``relative`` else ``epsilon``, eigenvalues clamped at 0 first."""
    values, vectors = torch.linalg.eigh(matrix.double())
    values = values.clamp_min(0)
    ridge = epsilon * float(values.max()) if relative else epsilon
    values = values + (ridge if ridge > 0 else 1.0)
    return vectors @ torch.diag(values ** -exponent) @ vectors.T


def null_mask(eigenvalues: torch.Tensor, epsilon: float, relative: bool) -> torch.Tensor:
    """The null directions: eigenvalue estimates below ``epsilon * max`` (or ``epsilon``)."""
    values = eigenvalues.clamp_min(0)
    return values < (epsilon * float(values.max()) if relative else epsilon)


def null_averaging(eigenvalues: torch.Tensor, epsilon: float, relative: bool) -> torch.Tensor:
    """The matrix that replaces the entries at the null directions by their mean and
    keeps the others."""
    null = null_mask(eigenvalues, epsilon, relative)
    averaging = torch.diag((~null).double())
    if bool(null.any()):
        averaging[null.nonzero()[:, 0].unsqueeze(1), null.nonzero()[:, 0]] = 1 / int(null.sum())
    return averaging


def outer_along(block: torch.Tensor, dim: int) -> torch.Tensor:
    """``B_(dim) B_(dim)^T`` by einsum."""
    letters = string.ascii_lowercase[:block.dim()]
    other = letters.replace(letters[dim], "A")
    return torch.einsum(f"{letters},{other}->{letters[dim]}A", block, block)


def kron_all(matrices: list[torch.Tensor]) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=torch.float64)
    for m in matrices:
        out = torch.kron(out, m)
    return out


@dataclass
class BlockRef:
    slices: tuple[slice, ...]
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    factors: dict[int, torch.Tensor] = field(default_factory=dict)
    roots: dict[int, torch.Tensor] = field(default_factory=dict)
    pending: tuple[int, dict[int, torch.Tensor]] | None = None  # (activation step, roots)


@dataclass
class ParamRef:
    merged_shape: tuple[int, ...]
    blocks: list[BlockRef]
    graft: torch.Tensor
    momentum: torch.Tensor


class ReferenceShampoo:
    """Follows SPEC 2.1-2.5 literally. ``groups`` is a list of (params, hparams) where
    ``params`` are float64 tensors updated in place and ``merged_shapes`` gives each
    parameter's merged shape (checked against the SPEC's rule in test_blocking)."""

    def __init__(self, params: list[torch.Tensor], merged_shapes: list[tuple[int, ...]],
                 lr=1e-3, betas=(0.9, 0.999), epsilon=1e-6, weight_decay=0.0,
                 block_size=1024, max_preconditioned_dim=8192, precondition_frequency=100,
                 start_preconditioning_step=None, statistics_frequency=1, grafting="adam",
                 grafting_beta2=0.999, grafting_epsilon=1e-8, exponent_multiplier=1.0,
                 nesterov=False, bias_correction=True, decoupled_weight_decay=True,
                 root_delay=None, precondition_1d=True, relative_epsilon=True,
                 first_moment=None, **_):
        self.params = params
        self.h = dict(lr=lr, beta1=betas[0], beta2=betas[1], eps=epsilon, wd=weight_decay,
                      pf=precondition_frequency,
                      start=start_preconditioning_step or precondition_frequency,
                      sf=statistics_frequency, grafting=grafting, gb2=grafting_beta2,
                      geps=grafting_epsilon, mult=exponent_multiplier, nesterov=nesterov,
                      bc=bias_correction, decoupled=decoupled_weight_decay,
                      delay=root_delay or 0, rel=relative_epsilon,
                      moment_of_gradient=first_moment in (None, "gradient"))
        self.state = []
        for p, merged in zip(params, merged_shapes):
            assert math.prod(merged) == p.numel()
            vector = sum(size > 1 for size in p.shape) <= 1
            ranges = []
            for size in merged:
                if size > max_preconditioned_dim or (vector and not precondition_1d):
                    ranges.append([(0, size)])
                else:
                    ranges.append([(s, min(s + block_size, size))
                                   for s in range(0, size, block_size)])
            dims = tuple(i for i, size in enumerate(merged)
                         if size <= max_preconditioned_dim and (precondition_1d or not vector))
            blocks = []
            for combo in itertools.product(*ranges):
                shape = tuple(b - a for a, b in combo)
                block = BlockRef(tuple(slice(a, b) for a, b in combo), shape, dims)
                for d in dims:
                    block.factors[d] = torch.zeros(shape[d], shape[d], dtype=torch.float64)
                    block.roots[d] = torch.eye(shape[d], dtype=torch.float64)
                blocks.append(block)
            zeros = torch.zeros(merged, dtype=torch.float64)
            self.state.append(ParamRef(tuple(merged), blocks, zeros.clone(), zeros.clone()))
        self.t = 0

    def step(self, grads: list[torch.Tensor | None]) -> None:
        h = self.h
        self.t += 1
        t = self.t
        for p, grad, st in zip(self.params, grads, self.state):
            if grad is None:
                continue
            g, w = self._gradient(p, grad, st)
            b1 = h["beta1"]
            if h["moment_of_gradient"]:
                # SPEC 2.5's alternative: precondition and graft the gradient's EMA x.
                x = g
                if b1 > 0:
                    st.momentum.mul_(b1).add_((1 - b1) * g)
                    m_hat = st.momentum / (1 - b1 ** t) if h["bc"] else st.momentum
                    x = b1 * m_hat + (1 - b1) * g if h["nesterov"] else m_hat
                a_full = self._grafting_direction(g, st, t, numerator=x)
            else:
                x = g
                a_full = self._grafting_direction(g, st, t)
            direction = torch.zeros_like(g)
            for block in st.blocks:
                gb = g[block.slices]
                xb = x[block.slices]
                ab = a_full[block.slices]
                if (t - 1) % h["sf"] == 0:
                    for d in block.dims:
                        outer = outer_along(gb, d)
                        if h["beta2"] == 1:
                            block.factors[d] += outer
                        else:
                            block.factors[d] = h["beta2"] * block.factors[d] + (1 - h["beta2"]) * outer
                # SPEC 4: roots from the statistics of step t are used from t + delay on.
                if block.pending is not None and block.pending[0] == t:
                    block.roots.update(block.pending[1])
                    block.pending = None
                if block.dims and t >= h["start"] and (t - h["start"]) % h["pf"] == 0:
                    updates = (t - 1) // h["sf"] + 1
                    c = 1.0 if h["beta2"] == 1 else 1 - h["beta2"] ** updates
                    exponent = h["mult"] / (2 * len(block.dims))
                    new = {d: reference_root(block.factors[d] / c, exponent, h["eps"], h["rel"])
                           for d in block.dims}
                    if h["delay"] == 0:
                        block.roots.update(new)
                    else:
                        block.pending = (t + h["delay"], new)
                if block.dims and t >= h["start"] + h["delay"]:
                    mats = [block.roots[d] if d in block.dims
                            else torch.eye(block.shape[d], dtype=torch.float64)
                            for d in range(len(block.shape))]
                    pb = (kron_all(mats) @ xb.reshape(-1)).reshape(block.shape)
                    if h["grafting"] != "none":
                        norm = pb.norm()
                        pb = pb * (ab.norm() / norm) if norm > 0 else torch.zeros_like(pb)
                else:
                    pb = ab
                direction[block.slices] = pb
            if h["moment_of_gradient"] or b1 == 0:
                u = direction
            else:
                st.momentum.mul_(b1).add_((1 - b1) * direction)
                m_hat = st.momentum / (1 - b1 ** t) if h["bc"] else st.momentum
                u = b1 * m_hat + (1 - b1) * direction if h["nesterov"] else m_hat
            if h["wd"] and h["decoupled"]:
                w.sub_(h["lr"] * h["wd"] * w)
            w.sub_(h["lr"] * u)

    def _gradient(self, p: torch.Tensor, grad: torch.Tensor,
                  st: ParamRef) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, w)``: the float64 gradient in the merged shape (with coupled weight decay
        added) and the parameter viewed in that shape."""
        g = grad.double().reshape(st.merged_shape).clone()
        w = p.data.view(st.merged_shape)
        if self.h["wd"] and not self.h["decoupled"]:
            g = g + self.h["wd"] * w
        return g, w

    def _grafting_direction(self, g: torch.Tensor, st: ParamRef, t: int,
                            numerator: torch.Tensor | None = None) -> torch.Tensor:
        """The grafting direction over the whole parameter (elementwise methods): the
        accumulator takes ``g``, the direction is that of ``numerator`` (default ``g``)."""
        h = self.h
        x = g if numerator is None else numerator
        if h["grafting"] in ("none", "sgd"):
            return x
        if h["grafting"] == "adagrad":
            st.graft += g * g
            return x / (st.graft.sqrt() + h["geps"])
        st.graft.mul_(h["gb2"]).add_((1 - h["gb2"]) * g * g)
        c2 = 1 - h["gb2"] ** t if h["grafting"] == "adam" else 1.0
        return x / (st.graft.sqrt() / math.sqrt(c2) + h["geps"])


def reference_eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """Eigenvectors as columns, by decreasing eigenvalue."""
    return torch.linalg.eigh(factor)[1].flip(-1)


class ReferenceEigenvalueCorrected(ReferenceShampoo):
    """SPEC 2.6 literally, on the blocks and factors of :class:`ReferenceShampoo`: the
    first moment in parameter space, rotated every step; eigenbases by ``eigh`` or one
    power step and QR, computed at a refresh step from that step's factors and put in use
    ``root_delay`` steps later (default 1); Adam in the rotated space; explicit Kronecker
    products. When a basis goes into use the rotated second moment is projected,
    ``v_new[j] = sum_k C[k, j]^2 v[k]`` with ``C = U_old^T U_new``; every step, along each
    dimension, the entries at the basis' null directions (eigenvalue estimates
    ``diag(U^T S U)`` below ``epsilon`` times their largest) are replaced by their mean
    (the library's documented choices)."""

    def __init__(self, params, merged_shapes, grafting=None, eigenbasis_method="eigh",
                 basis_refresh_tolerance=0.0, factor_beta=None, adam_epsilon=1e-8,
                 precondition_1d=None, grafting_momentum=False, **options):
        if options.get("start_preconditioning_step") is None:
            options["start_preconditioning_step"] = 1  # the first basis at step 1, as SOAP
        if options.get("root_delay") is None:
            options["root_delay"] = 1  # a basis never rotates the gradient it came from
        super().__init__(params, merged_shapes, grafting=grafting or "adam",
                         precondition_1d=bool(precondition_1d), **options)
        beta2 = options.get("betas", (0.9, 0.999))[1]
        self.h.update(method=eigenbasis_method, tol=basis_refresh_tolerance,
                      fbeta=beta2 if factor_beta is None else factor_beta, aeps=adam_epsilon,
                      gmom=grafting_momentum)
        self.second_moments = [torch.zeros(st.merged_shape, dtype=torch.float64)
                               for st in self.state]
        self.has_basis: set[tuple[int, int, int]] = set()  # (param, block, dim)
        self.eigenvalues: dict[tuple[int, int, int], torch.Tensor] = {}
        self.refreshes = self.skips = 0

    def _refresh(self, key: tuple[int, int], block: BlockRef) -> dict[int, tuple | None]:
        """Per dimension, the new basis and its eigenvalue estimates (None: skipped)."""
        h = self.h
        new_bases = {}
        for d in block.dims:
            s, u = block.factors[d], block.roots[d]
            values = self.eigenvalues.get((*key, d))
            if (*key, d) not in self.has_basis or bool(
                    null_mask(values, h["eps"], h["rel"]).any()):
                new = reference_eigenbasis(s)  # no basis yet, or one with null directions
            else:
                p = u.T @ s @ u
                drift = (p - torch.diag(torch.diag(p))).norm() / s.norm()
                if h["tol"] > 0 and drift <= h["tol"]:
                    new_bases[d] = None
                    continue
                order = torch.argsort(torch.diag(p), descending=True)
                new = (reference_eigenbasis(s) if h["method"] == "eigh"
                       else torch.linalg.qr(s @ u[:, order]).Q)
            new_bases[d] = (new.contiguous(),  # torch.kron rejects QR's column-major Q
                            torch.diag(new.T @ s @ new))
        return new_bases

    def _install(self, key: tuple[int, int], block: BlockRef, vb: torch.Tensor,
                 new_bases: dict[int, tuple | None]) -> None:
        """Puts new bases in use (refreshes and skips are counted then, as the library
        does) and projects the second moment onto them."""
        weights = [torch.eye(size, dtype=torch.float64) for size in block.shape]
        for d, entry in new_bases.items():
            if entry is None:
                self.skips += 1
                continue
            self.refreshes += 1
            new, values = entry
            c = block.roots[d].T @ new
            weights[d] = c * c
            block.roots[d] = new
            self.eigenvalues[(*key, d)] = values
            self.has_basis.add((*key, d))
        vb.copy_((kron_all([w.T for w in weights]) @ vb.reshape(-1)).reshape(vb.shape))

    def _pooling(self, key: tuple[int, int], block: BlockRef) -> torch.Tensor:
        h = self.h
        return kron_all([null_averaging(self.eigenvalues[(*key, d)], h["eps"], h["rel"])
                         if (*key, d) in self.eigenvalues
                         else torch.eye(block.shape[d], dtype=torch.float64)
                         for d in range(len(block.shape))])

    def step(self, grads: list[torch.Tensor | None]) -> None:
        h = self.h
        self.t += 1
        t = self.t
        b1, b2 = h["beta1"], h["beta2"]
        c1 = 1 - b1 ** t if h["bc"] and b1 > 0 else 1.0
        c2 = 1 - b2 ** t if h["bc"] and b2 < 1 else 1.0
        for pi, (p, grad, st) in enumerate(zip(self.params, grads, self.state)):
            if grad is None:
                continue
            g, w = self._gradient(p, grad, st)
            st.momentum.mul_(b1).add_((1 - b1) * g)  # b1 = 0: the gradient itself
            if h["gmom"] and b1 > 0:  # graft to the grafting direction of the first moment
                m_hat = st.momentum / c1
                x = b1 * m_hat + (1 - b1) * g if h["nesterov"] else m_hat
                a_full = self._grafting_direction(g, st, t, numerator=x)
            else:
                a_full = self._grafting_direction(g, st, t)
            v = self.second_moments[pi]
            direction = torch.zeros_like(g)
            for bi, block in enumerate(st.blocks):
                gb, mb, vb = g[block.slices], st.momentum[block.slices], v[block.slices]
                if (t - 1) % h["sf"] == 0:
                    for d in block.dims:
                        outer = outer_along(gb, d)
                        fb = h["fbeta"]
                        block.factors[d] = (block.factors[d] + outer if fb == 1 else
                                            fb * block.factors[d] + (1 - fb) * outer)
                if block.pending is not None and block.pending[0] == t:
                    self._install((pi, bi), block, vb, block.pending[1])
                    block.pending = None
                if block.dims and t >= h["start"] and (t - h["start"]) % h["pf"] == 0:
                    new_bases = self._refresh((pi, bi), block)
                    if h["delay"] == 0:
                        self._install((pi, bi), block, vb, new_bases)
                    else:
                        block.pending = (t + h["delay"], new_bases)
                bases = kron_all([block.roots[d] if d in block.dims
                                  else torch.eye(block.shape[d], dtype=torch.float64)
                                  for d in range(len(block.shape))])
                g_rot = bases.T @ gb.reshape(-1)
                m_rot = bases.T @ mb.reshape(-1)
                v_rot = vb.reshape(-1)
                v_rot = v_rot + g_rot ** 2 if b2 == 1 else b2 * v_rot + (1 - b2) * g_rot ** 2
                v_rot = self._pooling((pi, bi), block) @ v_rot
                vb.copy_(v_rot.reshape(block.shape))
                numerator = (b1 * m_rot / c1 + (1 - b1) * g_rot if h["nesterov"] and b1 > 0
                             else m_rot / c1)
                pb = (bases @ (numerator / ((v_rot / c2).sqrt() + h["aeps"]))).reshape(block.shape)
                if h["grafting"] != "none":
                    norm = pb.norm()
                    pb = pb * (a_full[block.slices].norm() / norm) if norm > 0 else pb * 0
                direction[block.slices] = pb
            if h["wd"] and h["decoupled"]:
                w.sub_(h["lr"] * h["wd"] * w)
            w.sub_(h["lr"] * direction)
