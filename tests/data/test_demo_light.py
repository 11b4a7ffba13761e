"""The demo set's warm light: RGB gains on the white-light drawing, validated."""

import numpy as np
import pytest

from fastprompt.data.demo import DEMO_LIGHT, DemoConfig, DemoImages
from fastprompt.errors import FastpromptError


def test_light_scales_every_pixel_of_the_white_light_image():
    white = DemoImages(DemoConfig(light=(1.0, 1.0, 1.0)))
    warm = DemoImages(DemoConfig())
    assert DemoConfig().light == DEMO_LIGHT
    for i in (0, 137, 499):
        expected = np.clip(np.round(white.load(i).astype(np.float32) * np.asarray(DEMO_LIGHT, dtype=np.float32)), 0, 255)
        np.testing.assert_array_equal(warm.load(i), expected.astype(np.uint8))
        np.testing.assert_array_equal(warm.load(i), warm.load(i))  # still a function of (seed, class, k)


@pytest.mark.parametrize("light", [(1.0, 1.0), 1.0, (1.0, -0.5, 1.0), (1.0, "x", 1.0), (5.0, 1.0, 1.0)])
def test_bad_light_names_the_field(light):
    with pytest.raises(FastpromptError, match="light="):
        DemoConfig(light=light)
