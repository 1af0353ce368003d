"""Image preprocessing: RGB, pad-to-square (LLaVA) or resize, bounded size, normalised tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

ImageMode = Literal["pad", "resize"]
IMAGE_MODES: tuple[str, ...] = ("pad", "resize")


def _mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The mean as an 8-bit RGB colour: padding with it normalises to exactly zero-ish."""
    r, g, b = (int(round(255 * m)) for m in mean)
    return r, g, b


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited over `background`.

    A plain ``convert("RGB")`` keeps whatever colour hides under alpha = 0 (often black or
    garbage), so transparent logos would look different from the same logo on a page.
    """
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale: rescale to 8 bits, PIL's convert would clip to 255.
        array = np.asarray(image, dtype=np.float64)
        span = float(array.max() - array.min()) or 1.0
        array = ((array - array.min()) / span * 255.0).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> normalised float tensor (3, image_size, image_size).

    ``mode="pad"`` follows LLaVA-1.5: pad the shorter side to a square with the mean colour
    (which normalises to ~0, so the padding carries no signal), then resize; the aspect ratio
    is kept. ``mode="resize"`` stretches to the square directly. Images larger than
    ``max_pixels`` are first downscaled (aspect kept) so one huge image cannot blow up memory;
    they are never refused here (refusing is the shard reader's job, with its own bound).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        mode: ImageMode = "pad",
        max_pixels: int = 2048 * 2048,
    ) -> None:
        if mode not in IMAGE_MODES:
            raise ValueError(f"unknown image mode {mode!r}; valid: {sorted(IMAGE_MODES)}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values with std > 0, got {mean}, {std}")
        if max_pixels < image_size * image_size:
            raise ValueError(
                f"max_pixels={max_pixels} is below image_size**2={image_size**2}; raise it"
            )
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode: ImageMode = mode
        self.max_pixels = int(max_pixels)
        self._mean_t = torch.tensor(self.mean).view(3, 1, 1)
        self._std_t = torch.tensor(self.std).view(3, 1, 1)

    def bound(self, image: Image.Image) -> Image.Image:
        """Downscale (aspect kept) when width * height exceeds ``max_pixels``."""
        width, height = image.size
        if width * height <= self.max_pixels:
            return image
        scale = (self.max_pixels / (width * height)) ** 0.5
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)

    def square(self, image: Image.Image) -> Image.Image:
        """Make the RGB image ``image_size`` x ``image_size`` according to ``mode``."""
        side = self.image_size
        if self.mode == "pad":
            width, height = image.size
            if width != height:
                longest = max(width, height)
                canvas = Image.new("RGB", (longest, longest), _mean_colour(self.mean))
                canvas.paste(image, ((longest - width) // 2, (longest - height) // 2))
                image = canvas
        if image.size != (side, side):
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        return image

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """RGB, bounded and squared, as a uint8 tensor (3, image_size, image_size), not yet
        normalised: a quarter of the float32 size while it waits in a buffer."""
        image = to_rgb(image, background=_mean_colour(self.mean))
        image = self.square(self.bound(image))
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``.

        Elementwise, so normalising a stacked batch at once gives exactly the floats of
        normalising each image alone, in a few tensor operations instead of a few per image.
        """
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 pixels, got {pixels.dtype}")
        return (pixels.float().div_(255.0) - self._mean_t) / self._std_t

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Return the normalised tensor (3, image_size, image_size), float32."""
        return self.normalize(self.to_uint8(image))

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, mode={self.mode!r}, "
            f"mean={self.mean}, std={self.std}, max_pixels={self.max_pixels})"
        )
