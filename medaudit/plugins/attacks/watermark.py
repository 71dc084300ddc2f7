"""Watermarking attack: watermark.

Krawtchouk-moment watermarking used as a black-box attack.

Apostolidis & Papakostas, "Digital Watermarking as an Adversarial Attack on Medical Image
Analysis with Deep Learning", J. Imaging 8(6):155, 2022, https://doi.org/10.3390/jimaging8060155.
The embedding follows the dither-modulation (QIM) scheme of Papakostas, Tsougenis &
Koulouriotis, Appl. Math. Comput. 227, 2014, as summarised in ``shared/methods.md`` section 7.
Written from the method description; no code was copied.

Native torch, batched, on the model's device. Moments are computed in float64 and the
result is cast back to the input's dtype. The model is only queried for its predicted label,
under ``torch.no_grad()``; there is one host synchronisation per grid point, to select the
samples not fooled yet (only those are watermarked and queried; the search stops once all are).
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

from pydantic import Field, field_validator

from medaudit import hookimpl
from medaudit.core.components import Access, Attack, AttackFamily, Norm, Params
from medaudit.core.lazy import torch
from medaudit.core.perturbation import project
from medaudit.core.quality import psnr, ssim

log = logging.getLogger(__name__)


# -- Krawtchouk moments -----------------------------------------------------------------------


def _recurrence(n_points: int, p: float) -> torch.Tensor:
    """``K[x, n] = Kbar_n(x)`` from the three-term recurrence in ``n`` on the weighted
    polynomials (float64)."""
    N, M, q = n_points, n_points - 1, 1 - p
    x = torch.arange(N, dtype=torch.float64)
    K = torch.zeros(N, N, dtype=torch.float64)
    # sqrt of the binomial weight w(x) = C(M, x) p^x (1-p)^(M-x), through log-gamma so that
    # it neither overflows (C(M, x)) nor underflows early (p^x) for large N.
    log_w = (
        math.lgamma(N) - torch.lgamma(x + 1) - torch.lgamma(M - x + 1) + x * math.log(p) + (M - x) * math.log1p(-p)
    )
    K[:, 0] = torch.exp(0.5 * log_w)
    if N == 1:
        return K
    # Kbar_1 = (1 - x / (p M)) sqrt(w / rho_1), rho_1 = (1 - p) / (p M).
    K[:, 1] = (1 - x / (p * M)) * math.sqrt(p * M / q) * K[:, 0]
    for n in range(1, M):
        # Unweighted: p (M - n) K_{n+1} = (p (M - n) + n q - x) K_n - n q K_{n-1}, rewritten for
        # Kbar_n = K_n sqrt(w / rho_n) with rho_{n+1} / rho_n = (q / p) (n + 1) / (M - n).
        a = math.sqrt(p * (M - n) / (q * (n + 1))) / (p * (M - n))
        b = n * q * math.sqrt(p * p * (M - n) * (M - n + 1) / (q * q * (n + 1) * n)) / (p * (M - n))
        K[:, n + 1] = a * (p * (M - n) + n * q - x) * K[:, n] - b * K[:, n - 1]
    return K


def _jacobi(n_points: int, p: float, rec: torch.Tensor) -> torch.Tensor:
    """The same polynomials from the symmetric Jacobi matrix of the recurrence: with
    ``J[n, n] = p (M - n) + n q`` and ``J[n, n + 1] = -sqrt(p q (n + 1) (M - n))``,
    ``x Kbar_n(x) = sum_m J[n, m] Kbar_m(x)``, so row ``x`` of ``K`` is the unit eigenvector
    of ``J`` for the eigenvalue ``x``. Each row's sign is taken from the recurrence's row
    over the orders before it blows up (where it is the accurate, growing solution)."""
    N, M, q = n_points, n_points - 1, 1 - p
    n = torch.arange(N, dtype=torch.float64)
    off = -torch.sqrt(p * q * (n[:-1] + 1) * (M - n[:-1]))
    J = torch.diag(p * (M - n) + n * q) + torch.diag(off, 1) + torch.diag(off, -1)
    _, vecs = torch.linalg.eigh(J)  # eigenvalues ascending: 0, 1, ..., M
    K = vecs.T.clone()
    bad = ~torch.isfinite(rec) | (rec.abs() > 1)
    ok = ~(bad.cumsum(1) > 0)  # orders before the recurrence's first impossible value
    agree = (K * torch.where(ok, rec, torch.zeros_like(rec))).sum(1)
    return K * torch.where(agree < 0, -1.0, 1.0).to(K.dtype)[:, None]


@lru_cache(maxsize=32)
def _krawtchouk_cpu(n_points: int, p: float) -> torch.Tensor:
    K = _recurrence(n_points, p)
    eye = torch.eye(n_points, dtype=torch.float64)
    if torch.isfinite(K).all() and (K.T @ K - eye).abs().max() <= 1e-10:
        return K
    return _jacobi(n_points, p, K)


def krawtchouk_matrix(
    n_points: int, p: float = 0.5, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The ``N x N`` matrix ``K[x, n] = Kbar_n(x; p, N - 1)`` of weighted (orthonormal)
    Krawtchouk polynomials, so that ``K.T @ K = I``.

    Computed in float64 with the three-term recurrence in the order ``n`` on the weighted
    polynomials (the normalisation ``sqrt(w(x) / rho(n))`` is carried through it, the
    weight from log-gamma). The recurrence is exact to ~1e-13 for small N (N = 64 at
    p = 0.5) but, as is known, unstable at high orders for larger N or p far from 0.5. When
    ``K^T K`` deviates from ``I`` by more than 1e-10 the matrix is instead computed from the
    eigenvectors of the recurrence's symmetric Jacobi matrix (stable; signs matched to the
    recurrence's accurate low orders), which is orthonormal to rounding for any N.
    """
    if n_points < 1:
        raise ValueError("n_points must be positive")
    if not 0 < p < 1:
        raise ValueError("p must lie in (0, 1)")
    return _krawtchouk_cpu(int(n_points), float(p)).to(device=device, dtype=torch.float64 if dtype is None else dtype)


def moments(img: torch.Tensor, k_rows: torch.Tensor, k_cols: torch.Tensor) -> torch.Tensor:
    """2D Krawtchouk moments ``Q = K_rows^T @ img @ K_cols`` over the last two dimensions."""
    return k_rows.transpose(-1, -2) @ img @ k_cols


def reconstruct(q: torch.Tensor, k_rows: torch.Tensor, k_cols: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`moments`: ``img = K_rows @ Q @ K_cols^T`` (exact with all orders)."""
    return k_rows @ q @ k_cols.transpose(-1, -2)


def zigzag_indices(height: int, width: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` moment orders ``(n, m)`` (n < height, m < width) in JPEG-style
    zig-zag order, skipping ``(0, 0)`` (the mean): anti-diagonals ``n + m = 1, 2, ...``,
    walked alternately from ``(s, 0)`` up to ``(0, s)`` (even s) and back (odd s)."""
    if count > height * width - 1:
        raise ValueError(f"a {height}x{width} image has only {height * width - 1} moments besides (0, 0); asked {count}")
    rows, cols = [], []
    s = 1
    while len(rows) < count:
        diag = [(n, s - n) for n in range(min(s, height - 1), -1, -1) if s - n < width]
        if s % 2:
            diag.reverse()
        for n, m in diag[: count - len(rows)]:
            rows.append(n)
            cols.append(m)
        s += 1
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


# -- quantisation index modulation -----------------------------------------------------------


def _dither(bits: torch.Tensor, u: torch.Tensor, delta: float) -> torch.Tensor:
    """Dither of each bit: ``d0 = (u - 1/2) delta`` in [-delta/2, delta/2) (secret key) and
    ``d1 = d0 - sign(d0) delta / 2`` (sign(0) taken as +1)."""
    d0 = (u - 0.5) * delta
    sign = torch.where(d0 >= 0, 1.0, -1.0).to(d0.dtype)
    return torch.where(bits.bool(), d0 - sign * delta / 2, d0)


def qim_embed(q: torch.Tensor, bits: torch.Tensor, u: torch.Tensor, delta: float) -> torch.Tensor:
    """Dither modulation: ``Q' = delta * round((Q - d_b) / delta) + d_b`` (elementwise)."""
    d = _dither(bits, u, delta)
    return delta * torch.round((q - d) / delta) + d


def qim_extract(q: torch.Tensor, u: torch.Tensor, delta: float) -> torch.Tensor:
    """Minimum-distance decoder: the bit whose dithered lattice lies nearer to ``Q``."""
    dist = [(q - qim_embed(q, torch.full_like(q, b), u, delta)).abs() for b in (0, 1)]
    return (dist[1] < dist[0]).to(torch.long)


def embed(
    x: torch.Tensor, bits: torch.Tensor, u: torch.Tensor, delta: float, *, p_rows: float = 0.5, p_cols: float = 0.5
) -> torch.Tensor:
    """Watermark images ``x`` (``N x C x H x W``) with ``L = bits.shape[-1]`` bits per channel.

    ``bits`` and the dither keys ``u`` (uniform in [0, 1)) are ``N x C x L``; bit ``i`` goes
    into the ``i``-th moment of :func:`zigzag_indices`. Returns the unclipped watermarked
    image in float64: ``x + K_rows (Q' - Q) K_cols^T``.
    """
    h, w = x.shape[-2:]
    kr = krawtchouk_matrix(h, p_rows, device=x.device)
    kc = krawtchouk_matrix(w, p_cols, device=x.device)
    rows, cols = zigzag_indices(h, w, bits.shape[-1])
    rows, cols = rows.to(x.device), cols.to(x.device)
    x64 = x.to(torch.float64)
    q = moments(x64, kr, kc)
    sel = q[..., rows, cols]
    change = torch.zeros_like(q)
    change[..., rows, cols] = qim_embed(sel, bits.to(torch.float64), u.to(torch.float64), delta) - sel
    return x64 + reconstruct(change, kr, kc)


def extract(
    x: torch.Tensor, u: torch.Tensor, delta: float, *, p_rows: float = 0.5, p_cols: float = 0.5
) -> torch.Tensor:
    """Read back the ``L = u.shape[-1]`` bits per channel embedded by :func:`embed`."""
    h, w = x.shape[-2:]
    kr = krawtchouk_matrix(h, p_rows, device=x.device)
    kc = krawtchouk_matrix(w, p_cols, device=x.device)
    rows, cols = zigzag_indices(h, w, u.shape[-1])
    q = moments(x.to(torch.float64), kr, kc)[..., rows.to(x.device), cols.to(x.device)]
    return qim_extract(q, u.to(torch.float64), delta)


# -- the attack ------------------------------------------------------------------------------


class WatermarkParams(Params):
    lengths: list[int] = Field(
        [64, 256, 1024], min_length=1, description="Message lengths L (bits per channel) to try; each < H*W."
    )
    strengths: list[float] = Field(
        [0.1, 0.2, 0.4, 0.8, 1.2], min_length=1,
        description="QIM steps Delta to try, in moment units of images in [0, 1] (the paper's 50..300 on 0..255 "
        "is about 0.2..1.2).",
    )
    p_rows: float = Field(0.5, gt=0, lt=1, description="Krawtchouk parameter p along the rows (0.5: centred).")
    p_cols: float = Field(0.5, gt=0, lt=1, description="Krawtchouk parameter p along the columns.")

    @field_validator("lengths")
    @classmethod
    def _positive_lengths(cls, v):
        if any(length < 1 for length in v):
            raise ValueError("message lengths must be positive")
        return v

    @field_validator("strengths")
    @classmethod
    def _positive_strengths(cls, v):
        if any(not (d > 0 and math.isfinite(d)) for d in v):
            raise ValueError("strengths must be positive and finite")
        return v


class Watermark(Attack):
    """Watermarking attack: embed a Krawtchouk-moment QIM watermark, growing its length and strength until the label flips.

    Apostolidis & Papakostas, "Digital Watermarking as an Adversarial Attack on Medical
    Image Analysis with Deep Learning", J. Imaging 8(6):155, 2022. Untargeted, decision-based
    black box: the model is only asked for its predicted label (no scores, no gradients).
    A pseudo-random message of ``L`` bits (drawn from the run's generator, with a secret
    dither key) is embedded per channel by dither modulation (QIM, step ``Delta``) into ``L``
    weighted-Krawtchouk moments of the image; the watermarked image is the reconstruction,
    clipped to [0, 1] and projected into the eps-ball of the threat model (L-inf or L2), so
    the budget always holds. Per sample, the grid of ``(L, Delta)`` is walked in order of
    increasing expected distortion ``L * Delta^2`` and the first watermarked image that is
    misclassified (predicted label != y) is kept; a sample never fooled gets the last
    (strongest) watermarked image. PSNR and SSIM of the returned images against the clean
    ones are kept per sample in ``last_psnr`` / ``last_ssim`` (and ``last_fooled``,
    ``last_grid_index``; ``grid`` lists the (L, Delta) order) and their means are logged.
    Defaults: L in {64, 256, 1024}, Delta in {0.1, 0.2, 0.4, 0.8, 1.2}, p1 = p2 = 0.5.
    2D images only (any number of channels, each watermarked on its own).

    Details the paper leaves open, and the choices made here:

    - Moment selection: the first L orders in JPEG-style zig-zag order over anti-diagonals
      n + m = 1, 2, ..., skipping (0, 0) (low orders; the paper's rule is not given).
    - QIM variant: dither modulation, d0 ~ U[-Delta/2, Delta/2) per moment (secret key),
      d1 = d0 - sign(d0) Delta/2, Q' = Delta round((Q - d_b)/Delta) + d_b; minimum-distance
      decoding. Delta is in moment units of images in [0, 1] (the basis is orthonormal, so a
      moment change of Delta/2 moves the image by Delta/2 in L2).
    - Message: i.i.d. fair bits, one message and key per sample and channel, drawn once per
      batch for the largest L (shorter messages are its prefixes), so grid points nest.
    - Search grid and order: the lengths x strengths grid sorted by L * Delta^2 (then L);
      the paper reports a fixed grid (L = 100..1000, Delta = 50..300 on 0..255) per data set,
      not a per-image search. Success means predicted label != y (as the other attacks).
    - Krawtchouk parameter p: fixed (p_rows, p_cols), default 0.5 (centred support); the
      paper's per-cell search over (p1, p2) in {0.1, ..., 0.9} is not done here (run
      several instances with other p to cover it).
    - Clipping and projection: the watermarked image is clipped to [0, 1] (not rounded to 8
      bits) and then projected onto the eps-ball; both can destroy part of the watermark
      (the message may no longer be decodable), which is accepted: the attack is judged on
      the model's errors and the image quality, not on watermark recovery.
    """

    name = "watermark"
    family = AttackFamily.DECISION_BASED
    norms = frozenset({Norm.LINF, Norm.L2})
    dims = frozenset({2})
    needs = Access.DECISIONS
    Params = WatermarkParams

    def __init__(self, params: WatermarkParams | None = None):
        super().__init__(params)
        p: WatermarkParams = self.params
        #: (L, Delta) in the order they are tried.
        self.grid: list[tuple[int, float]] = sorted(
            {(int(length), float(d)) for length in p.lengths for d in p.strengths}, key=lambda g: (g[0] * g[1] ** 2, g[0], g[1])
        )
        self.last_psnr: torch.Tensor | None = None
        self.last_ssim: torch.Tensor | None = None
        self.last_fooled: torch.Tensor | None = None
        self.last_grid_index: torch.Tensor | None = None

    def cost(self, num_classes: int) -> float:
        """One query per (length, strength) tried, at most."""
        return float(len(self.params.lengths) * len(self.params.strengths))

    def perturb(self, model, x, y, *, eps, norm, generator):
        if x.dim() != 4:
            raise ValueError(f"watermark supports 2D images (N x C x H x W); got shape {tuple(x.shape)}")
        x = x.detach()
        if eps == 0:
            out = x.clone()
            fooled = torch.zeros_like(y, dtype=torch.bool)
            index = torch.full_like(y, -1)
        else:
            with torch.no_grad():
                out, fooled, index = self._search(model, x, y, eps, norm, generator)
        self._record(x, out, fooled, index)
        return out

    def _search(self, model, x, y, eps, norm, generator):
        p: WatermarkParams = self.params
        n, c, h, w = x.shape
        l_max = max(length for length, _ in self.grid)
        if l_max > h * w - 1:
            raise ValueError(f"message length {l_max} exceeds the {h * w - 1} usable moments of a {h}x{w} image")
        bits = (torch.rand((n, c, l_max), generator=generator, device=x.device) < 0.5).to(torch.float64)
        keys = torch.rand((n, c, l_max), generator=generator, device=x.device).to(torch.float64)

        out = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        index = torch.full((n,), -1, dtype=torch.long, device=x.device)
        for i, (length, delta) in enumerate(self.grid):
            # Only the samples not fooled yet are watermarked and queried: a fooled one keeps
            # its first fooling image, so querying it again would change nothing.
            idx = (~fooled).nonzero().squeeze(1)  # one host sync per grid point
            if len(idx) == 0:
                break
            xs = x[idx]
            marked = embed(xs, bits[idx, :, :length], keys[idx, :, :length], delta, p_rows=p.p_rows, p_cols=p.p_cols)
            cand = project(marked.clamp(0, 1).to(x.dtype), xs, eps, norm)
            newly = model(cand).argmax(1) != y[idx]
            # Samples not fooled yet follow the grid, so they end on the strongest image.
            out[idx] = cand
            index[idx] = torch.where(newly, torch.full_like(newly, i, dtype=index.dtype), index[idx])
            fooled[idx] = newly
        return out, fooled, index

    def _record(self, x, out, fooled, index):
        self.last_psnr = psnr(out, x).float().cpu()
        self.last_ssim = ssim(out, x).float().cpu()
        self.last_fooled = fooled.cpu()
        self.last_grid_index = index.cpu()
        finite = self.last_psnr[torch.isfinite(self.last_psnr)]
        log.info(
            "watermark: %d/%d samples fooled; mean PSNR %.2f dB (over %d changed images), mean SSIM %.4f",
            int(self.last_fooled.sum()), len(self.last_fooled),
            float(finite.mean()) if len(finite) else float("inf"), len(finite), float(self.last_ssim.mean()),
        )


@hookimpl
def register_attacks(register):
    register(Watermark)
