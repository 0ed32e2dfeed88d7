"""verify's error measure: relative to the tensor, floored at a share of the step's gradients."""

from __future__ import annotations

import numpy as np

from runtime.verify import rel_err


def test_rounding_noise_on_a_zero_gradient_is_not_a_failure():
    noise, other = np.array([1e-10, -2e-10]), np.array([-1e-10, 1e-10])
    assert rel_err(noise, other) > 0.5  # noise over noise
    assert rel_err(noise, other, floor=1e-2 * 0.2) < 1e-6  # on the step's gradient scale


def test_real_differences_still_fail():
    ref = np.array([1.0, -2.0, 3.0])
    assert rel_err(ref * (1 + 1e-3), ref, floor=1e-2) > 1e-5
    assert rel_err(ref.reshape(3, 1), ref) == float("inf")
