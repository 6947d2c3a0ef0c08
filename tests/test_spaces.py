"""Search spaces: each dimension's distribution (moments, bounds), reproducibility from the key, the
explore moves of population-based training, and the errors for bad spaces."""

import math

import jax
import numpy as np
import pytest

import gradtx
from gradtx.spaces import sample

N = 100_000  # draws per distribution check
KEY = jax.random.PRNGKey(7)


def assert_moments(x, mean, variance):
    # The sample mean of N draws has standard error sqrt(variance / N); the sample variance's standard
    # error is about variance * sqrt(2 / N) for these light-tailed laws (that of a normal; the uniform's
    # is smaller). 5 standard errors: a false alarm about once in 3 million runs.
    x = np.asarray(x, np.float64)
    assert abs(x.mean() - mean) < 5 * math.sqrt(variance / N), (x.mean(), mean)
    assert abs(x.var() - variance) < 5 * variance * math.sqrt(2 / N), (x.var(), variance)


def test_log_uniform_is_uniform_in_the_log_and_stays_in_its_bounds():
    low, high = 1e-4, 1e-1
    x = np.asarray(sample({"lr": gradtx.log_uniform(low, high)}, KEY, N)["lr"])
    assert x.dtype == np.float32 and x.min() >= low and x.max() <= high
    a, b = math.log(low), math.log(high)
    assert_moments(np.log(x.astype(np.float64)), (a + b) / 2, (b - a) ** 2 / 12)
    # Each decade equally likely: a third of the draws in [1e-3, 1e-2).
    share = np.mean((x >= 1e-3) & (x < 1e-2))
    assert abs(share - 1 / 3) < 5 * math.sqrt(2 / 9 / N)


def test_uniform_has_the_uniform_moments_and_bounds():
    x = np.asarray(sample({"beta": gradtx.uniform(0.8, 0.99)}, KEY, N)["beta"])
    assert x.min() >= 0.8 and x.max() < 0.99
    assert_moments(x, (0.8 + 0.99) / 2, 0.19**2 / 12)


def test_int_uniform_draws_every_whole_number_of_its_range_equally_often():
    x = np.asarray(sample({"k": gradtx.int_uniform(2, 6)}, KEY, N)["k"])
    assert x.dtype == np.int32 and set(np.unique(x)) == {2, 3, 4, 5, 6}
    counts = np.bincount(x - 2) / N
    np.testing.assert_allclose(counts, 0.2, atol=5 * math.sqrt(0.2 * 0.8 / N))  # binomial standard error
    assert_moments(x, 4.0, (5**2 - 1) / 12)  # discrete uniform over 5 values


def test_choice_draws_only_its_values_equally_often():
    values = [0.0, 0.5, 0.9, 0.99]
    x = np.asarray(sample({"m": gradtx.choice(values)}, KEY, N)["m"])
    found, counts = np.unique(x, return_counts=True)
    np.testing.assert_array_equal(found, np.asarray(values, np.float32))
    np.testing.assert_allclose(counts / N, 0.25, atol=5 * math.sqrt(0.25 * 0.75 / N))


def test_fixed_numbers_are_repeated():
    drawn = sample({"learning_rate": 0.1, "steps": 3}, KEY, 4)
    np.testing.assert_array_equal(drawn["learning_rate"], np.float32(0.1))
    assert drawn["steps"].dtype == np.int32 and drawn["steps"].tolist() == [3] * 4


def test_the_same_key_gives_the_same_configurations_and_another_key_others():
    space = {
        "lr": gradtx.log_uniform(1e-4, 1.0),
        "beta": gradtx.uniform(0.0, 1.0),
        "k": gradtx.int_uniform(0, 99),
    }
    a, b, c = sample(space, KEY, 64), sample(space, KEY, 64), sample(space, jax.random.PRNGKey(8), 64)
    for name in space:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])


def test_a_field_keeps_its_values_when_another_field_is_added():
    one = sample({"lr": gradtx.log_uniform(1e-4, 1.0)}, KEY, 32)
    two = sample({"lr": gradtx.log_uniform(1e-4, 1.0), "beta": gradtx.uniform(0.0, 1.0)}, KEY, 32)
    np.testing.assert_array_equal(one["lr"], two["lr"])
    assert not np.array_equal(two["lr"], two["beta"])  # the fields use different keys


def test_perturbing_multiplies_and_clips_to_the_bounds():
    x = np.asarray([0.001, 0.05, 0.09], np.float32)
    up = np.asarray(gradtx.log_uniform(1e-3, 0.1).perturb(x, np.float32(1.25)))
    np.testing.assert_allclose(up, [0.00125, 0.0625, 0.1], rtol=1e-6)
    down = np.asarray(gradtx.uniform(0.9, 0.99).perturb(np.asarray([0.95], np.float32), np.float32(0.8)))
    np.testing.assert_allclose(down, [0.9])
    whole = gradtx.int_uniform(1, 10).perturb(np.asarray([4.0, 10.0], np.float32), np.float32(1.25))
    np.testing.assert_array_equal(whole, [5.0, 10.0])  # round(4 * 1.25), and clipped at 10


def test_perturbing_a_choice_moves_to_the_neighbouring_value():
    dim = gradtx.choice([0.0, 0.5, 0.9])
    x = np.asarray([0.0, 0.5, 0.9], np.float32)
    np.testing.assert_array_equal(dim.perturb(x, np.float32(1.25)), np.float32([0.5, 0.9, 0.9]))
    np.testing.assert_array_equal(dim.perturb(x, np.float32(0.8)), np.float32([0.0, 0.0, 0.5]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: gradtx.log_uniform(0.0, 1.0), "log_uniform: needs 0 < low < high, got low=0"),
        (lambda: gradtx.log_uniform(1e-3, float("inf")), "log_uniform: high must be finite"),
        (lambda: gradtx.uniform(1.0, 1.0), "uniform: needs low < high, got low=1, high=1"),
        (lambda: gradtx.int_uniform(1.5, 3), "int_uniform: low must be an int, got 1.5"),
        (lambda: gradtx.int_uniform(3, 1), "int_uniform: needs low <= high, got low=3, high=1"),
        (lambda: gradtx.choice([]), "choice: values must be a non-empty list"),
        (lambda: gradtx.choice(["adam"]), "choice: every value must be a number, got 'adam'"),
        (lambda: sample({}, KEY, 3), "sample: space must be a non-empty dict"),
        (lambda: sample({"lr": "high"}, KEY, 3), "sample: space\\['lr'\\] must be a number, got 'high'"),
        (lambda: sample({"lr": 0.1}, KEY, 0), "sample: n must be an int >= 1, got 0"),
        # Values beyond int32 / float32 would wrap around, become inf, NaN or 0 on the device.
        (lambda: sample({"n": 2**40}, KEY, 3), "sample: space\\['n'\\] must fit in int32, got 1099511627776"),
        (lambda: sample({"x": 1e39}, KEY, 3), "sample: space\\['x'\\] must fit in float32"),
        (lambda: gradtx.uniform(-1e39, 1e39), "uniform: low must fit in float32"),
        (lambda: gradtx.uniform(-3e38, 3e38), "uniform: high - low must fit in float32"),
        (lambda: gradtx.log_uniform(1e-45, 1e-40), "log_uniform: low must be >= 1.18e-38"),
        (lambda: gradtx.choice([1, 2**33]), "choice: every value must fit in int32"),
    ],
)
def test_bad_spaces_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
