"""Decoding gives exactly the tensors training saw, upright, in the model's mode."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from erde.artifact import InputSpec
from erde.data import normalize
from service.engine.decode import DecodeTooSlow, decode_budget, decode_image
from service.engine.limits import ImageLimits, check_request_pixels
from service.errors import PayloadTooLarge
from tests.service import images

LIMITS = ImageLimits(16_000_000, 8, ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"))


@pytest.mark.parametrize(("spec", "image"), [
    (InputSpec("L", 28, (0.286,), (0.353,)), images.texture(1, 28)),
    (InputSpec("RGB", 28, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)), images.noise(28, 1, "RGB")),
])
def test_decoded_tensor_equals_the_training_normalisation(spec: InputSpec, image) -> None:
    got = decode_image(images.encode(image), spec, LIMITS)
    pixels = torch.from_numpy(np.array(image.convert(spec.mode))).reshape(28, 28, -1).permute(2, 0, 1)
    assert got.shape == (spec.channels, 28, 28)
    assert torch.allclose(got, normalize(pixels[None], spec)[0], atol=1e-6)


def test_exif_orientation_is_applied() -> None:
    spec = InputSpec("L", 32, (0.5,), (0.25,))
    upright = images.texture(0, 32)
    straight = decode_image(images.encode(upright, "JPEG", quality=100), spec, LIMITS)
    rotated = decode_image(images.exif_rotated_jpeg(upright), spec, LIMITS)
    assert (rotated - straight).abs().mean() < 0.05 < (straight - straight.transpose(1, 2)).abs().mean()


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge):
        decode_image(images.pixel_bomb(5000, 5000), InputSpec("L", 28, (0.5,), (0.5,)),
                     ImageLimits(1_000_000, 8, ("PNG",)))


SPEC_28 = InputSpec("L", 28, (0.5,), (0.5,))
SCALED = ImageLimits(16_000_000, 8, ("PNG", "WEBP"), pixels_ratio=1024, request_pixels=4_000_000)


@pytest.mark.parametrize(("limits", "size", "expected"), [
    (SCALED, 28, 802_816),  # 1024 x 28 x 28
    (SCALED, 224, 4_000_000),  # the request total caps a large model's image too
    (ImageLimits(1_000_000, 8, ("PNG",), pixels_ratio=4096), 224, 1_000_000),  # the server ceiling
    (LIMITS, 28, 16_000_000),  # no ratio, no request total: the ceiling alone
])
def test_pixel_limit_per_image_follows_the_model_input(limits: ImageLimits, size: int, expected: int) -> None:
    assert limits.pixels_for(InputSpec("L", size, (0.5,), (0.5,))) == expected


def test_an_image_over_the_models_limit_is_refused_before_decoding() -> None:
    side = 897  # 896 x 896 = 802,816 is the most for 28 x 28
    with pytest.raises(PayloadTooLarge, match="pixels this model takes"):
        decode_image(images.pixel_bomb(side, side), SPEC_28, SCALED)
    assert decode_image(images.encode(images.noise(896)), SPEC_28, SCALED).shape == (1, 28, 28)


def test_request_pixels_are_summed_from_the_headers() -> None:
    tile = images.encode(images.noise(1000))  # 1 M pixels
    check_request_pixels([tile] * 4, SCALED)  # 4 M: at the limit
    check_request_pixels([tile] * 4 + [b"not an image"], SCALED)  # left for the decoder to refuse
    check_request_pixels([images.pixel_bomb(30000, 30000)], SCALED)  # one image: its own limit decides
    for too_many in ([tile] * 5, [tile, images.pixel_bomb(30000, 30000)]):
        with pytest.raises(PayloadTooLarge, match="together"):
            check_request_pixels(too_many, SCALED)


def test_the_two_step_resize_is_as_good_as_the_exact_one() -> None:
    """reducing_gap=3 shrinks by an integer factor first: on a textured 20x image, what reaches the
    network differs from the exact resize by at most two levels in 255."""
    image = images.texture(2, 560, seed=3)  # 20 x 28
    exact = image.resize((28, 28), Image.BILINEAR)
    got = decode_image(images.encode(image), SPEC_28, SCALED)
    expected = normalize(torch.from_numpy(np.array(exact))[None, None], SPEC_28)[0]
    diff = (got - expected).abs() * SPEC_28.std[0] * 255  # in 8-bit levels
    assert diff.mean() < 0.5 and diff.max() < 2.5, (diff.mean(), diff.max())  # measured: 0.18 and 1


def test_a_decode_budget_signal_that_arrives_after_its_image_does_nothing() -> None:
    """The handler stays set for a whole batch; a SIGPROF pending once an image is done must not raise into
    the next step of the batch (outside any image's `except DecodeTooSlow`, it would end the process)."""
    with decode_budget(10.0) as budget:
        with budget:
            assert budget.armed and signal.getitimer(signal.ITIMER_PROF)[0] > 0
            budget.expired(signal.SIGPROF, None)  # an earlier image's, handled late: this timer still runs
            signal.setitimer(signal.ITIMER_PROF, 0)  # as when it fires
            with pytest.raises(DecodeTooSlow):
                budget.expired(signal.SIGPROF, None)
        budget.expired(signal.SIGPROF, None)  # pending once the image was done: ignored
        with budget:
            pass
        assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGPROF) is not budget.expired
