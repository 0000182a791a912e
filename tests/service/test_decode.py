"""Decoding gives exactly the tensors training saw, upright, in the model's mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erde.data import InputSpec, normalize
from service.decode import ImageLimits, decode_image
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
