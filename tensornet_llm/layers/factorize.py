"""Split a feature dimension into per-site leg sizes.

A tensor-network layer views ``in_features`` as a multi-index ``(i_1, ..., i_N)`` and
``out_features`` as ``(o_1, ..., o_N)``; site ``k`` carries the pair of legs ``(o_k, i_k)``.
This module chooses those leg sizes.

Rules
-----
* Factors are as balanced as possible (smallest spread of ``log f``), then arranged
  *centre-heavy*: the largest factor sits on the middle site and sizes fall off towards the
  ends, so the bonds near the edges stay small.  ``576 -> (8, 9, 8)``, ``1536 -> (8, 16, 12)``.
* Legs of size 1 are allowed, so every integer factors exactly.
* If the exact factorisation is badly unbalanced (a large prime factor, e.g. ``50257 = 29 * 1733``
  or ``7`` over three sites), the dimension is **padded** to the smallest ``m >= n`` whose
  factorisation is balanced: the largest factor is at most ``2 * ceil(n ** (1 / n_sites))``.
  Layers zero-pad inputs to ``m`` and drop the extra outputs, so results stay exact; padding
  costs a few parameters and is reported as ``padded_in`` / ``padded_out``.
"""

from __future__ import annotations

import math
from functools import lru_cache

from ..errors import ArgumentError

__all__ = ["factorize", "balanced_factors", "centre_heavy", "prime_factors"]


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` (with multiplicity), ascending."""
    out: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1 if p == 2 else 2
    if n > 1:
        out.append(n)
    return out


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def _spread(factors: tuple[int, ...], n: int) -> float:
    """Squared deviation of ``log f`` from the ideal ``log n / len(factors)``."""
    target = math.log(n) / len(factors)
    return sum((math.log(f) - target) ** 2 for f in factors)


@lru_cache(maxsize=4096)
def balanced_factors(n: int, n_sites: int) -> tuple[int, ...]:
    """The most balanced ascending tuple of ``n_sites`` positive integers whose product is ``n``.

    Exhaustive over multiplicative partitions (non-decreasing factor tuples), which is small for
    the sizes found in neural networks.
    """
    if n < 1 or n_sites < 1:
        raise ArgumentError(f"n and n_sites must be >= 1, got n={n}, n_sites={n_sites}")
    divisors = _divisors(n)
    best: tuple[float, tuple[int, ...]] | None = None

    def search(rest: int, sites_left: int, lo: int, prefix: tuple[int, ...]) -> None:
        nonlocal best
        if sites_left == 1:
            if rest >= lo:
                cand = prefix + (rest,)
                key = (_spread(cand, n), cand)
                if best is None or key < best:
                    best = key
            return
        # Non-decreasing order: the next factor f satisfies f ** sites_left <= rest.
        for f in divisors:
            if f < lo or rest % f:
                continue
            if f**sites_left > rest:
                break
            search(rest // f, sites_left - 1, f, prefix + (f,))

    search(n, n_sites, 1, ())
    assert best is not None  # (1, ..., 1, n) always exists
    return best[1]


def centre_heavy(factors: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """Arrange factors with the largest in the middle, decreasing towards both ends.

    ``(8, 12, 16) -> (8, 16, 12)``; ``(2, 3, 5, 7) -> (3, 7, 5, 2)``.
    """
    ordered = sorted(factors, reverse=True)
    n = len(ordered)
    slots: list[int] = [0] * n
    centre = (n - 1) // 2
    # Fill outward from the centre: centre, centre+1, centre-1, centre+2, ...
    positions = [centre]
    step = 1
    while len(positions) < n:
        for p in (centre + step, centre - step):
            if 0 <= p < n and len(positions) < n:
                positions.append(p)
        step += 1
    for pos, f in zip(positions, ordered):
        slots[pos] = f
    return tuple(slots)


def _balanced_enough(factors: tuple[int, ...], n: int, n_sites: int) -> bool:
    return max(factors) <= 2 * math.ceil(n ** (1.0 / n_sites) - 1e-9)


@lru_cache(maxsize=4096)
def factorize(n: int, n_sites: int, allow_padding: bool = True) -> tuple[tuple[int, ...], int]:
    """Leg sizes for a dimension of size ``n`` split over ``n_sites`` sites.

    Returns ``(shape, padded_n)`` where ``math.prod(shape) == padded_n >= n``.  ``padded_n == n``
    unless ``n`` has no balanced factorisation and ``allow_padding`` is true (see module docs).
    """
    if not isinstance(n, int) or n < 1:
        raise ArgumentError(f"feature size must be a positive integer, got {n!r}")
    if not isinstance(n_sites, int) or n_sites < 1:
        raise ArgumentError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    exact = balanced_factors(n, n_sites)
    if not allow_padding or n_sites == 1 or _balanced_enough(exact, n, n_sites):
        return centre_heavy(exact), n
    m = n + 1
    while True:
        cand = balanced_factors(m, n_sites)
        if _balanced_enough(cand, n, n_sites):
            return centre_heavy(cand), m
        m += 1
