"""The image limits as data, and the one of them the server checks itself: a request's pixels together.

The server reads them from the settings and hands them to each inference process, which applies every
other one as it decodes (service/engine/decode.py explains them). Nothing here decodes, so the server,
which imports no torch and no decoder, checks a request's total from the images' headers alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from erde.artifact import InputSpec
from service.engine import imagescan
from service.errors import PayloadTooLarge
from service.settings import Settings


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int  # per image, whatever the model: the ceiling
    min_side: int
    formats: tuple[str, ...]
    pixels_ratio: int | None = None  # per image: at most this many times the model's input pixels
    request_pixels: int | None = None  # all images of one request together (None: no such limit)
    decode_timeout_s: float | None = None  # per image, in the inference process (None: no such limit)

    @classmethod
    def from_settings(cls, s: Settings) -> ImageLimits:
        return cls(s.max_pixels, s.min_image_side, s.image_formats, s.max_pixels_ratio, s.max_request_pixels,
                   s.decode_timeout_ms / 1000)

    def pixels_for(self, spec: InputSpec) -> int:
        """The most pixels one image may have for a model with this input."""
        ratio = self.max_pixels if self.pixels_ratio is None else self.pixels_ratio * spec.size * spec.size
        return min(self.max_pixels, self.request_pixels or self.max_pixels, ratio)


def check_request_pixels(images: list[bytes], limits: ImageLimits) -> None:
    """Refuse (413) a request whose images together have more than `request_pixels` pixels. Only the
    sizes are read, by the structural scan's bounded walk to them (service/engine/imagescan.py: never more
    than its limits, whatever the file's size), on the event loop; Pillow is not involved. An image
    the scan does not know is left for the decoder to refuse with its own error. One image is bounded
    by `pixels_for` alone."""
    if len(images) < 2 or limits.request_pixels is None:
        return
    total = 0
    for data in images:
        layout = imagescan.size_of(data)
        if layout is None:
            continue
        total += layout.width * layout.height
        if total > limits.request_pixels:
            raise PayloadTooLarge(f"the images of this request have more than {limits.request_pixels} pixels "
                                  "together; send fewer or smaller ones", code="too_many_pixels")
