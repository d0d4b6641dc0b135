import math

import pytest
from hypothesis import given, strategies as st

from tensornet_llm.layers.factorize import balanced_factors, centre_heavy, factorize, prime_factors


@pytest.mark.parametrize(
    "n, sites, expected",
    [(576, 3, (8, 9, 8)), (1536, 3, (8, 16, 12)), (4096, 4, (8, 8, 8, 8)), (768, 2, (32, 24))],
)
def test_known_shapes(n, sites, expected):
    assert factorize(n, sites) == (expected, n)


@given(st.integers(1, 70000), st.integers(1, 5))
def test_factorisation_is_exact_or_padded_and_balanced(n, sites):
    shape, padded = factorize(n, sites)
    assert len(shape) == sites
    assert math.prod(shape) == padded >= n
    if padded > n:  # padding is only used to fix an unbalanced factorisation, and stays small
        assert max(balanced_factors(n, sites)) > 2 * math.ceil(n ** (1 / sites) - 1e-9)
        assert padded <= n * 1.25
    if sites > 1:
        assert max(shape) <= max(2 * math.ceil(n ** (1 / sites) - 1e-9), max(balanced_factors(n, sites)))


def test_primes_are_padded_not_crashed():
    assert factorize(7, 3) == ((2, 2, 2), 8)
    shape, padded = factorize(50257, 3)
    assert padded >= 50257 and math.prod(shape) == padded and max(shape) <= 74
    exact, size = factorize(50257, 3, allow_padding=False)
    assert size == 50257 and sorted(exact) == [1, 29, 1733]


@given(st.lists(st.integers(1, 50), min_size=1, max_size=7))
def test_centre_heavy_is_unimodal(factors):
    arranged = centre_heavy(factors)
    assert sorted(arranged) == sorted(factors)
    peak = arranged.index(max(arranged))
    assert all(arranged[i] <= arranged[i + 1] for i in range(peak))
    assert all(arranged[i] >= arranged[i + 1] for i in range(peak, len(arranged) - 1))


@given(st.integers(1, 10**6))
def test_prime_factors(n):
    ps = prime_factors(n)
    assert math.prod(ps) == n and ps == sorted(ps)
    assert all(all(p % q for q in range(2, math.isqrt(p) + 1)) for p in ps)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="feature size"):
        factorize(bad, 3)
    with pytest.raises(ValueError, match="n_sites"):
        factorize(12, bad)
