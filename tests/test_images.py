"""ImageTransform: RGB conversion, pad-with-mean vs resize, oversize bound, normalisation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_lit.data.images import ImageTransform, to_rgb

MEAN = (0.5, 0.25, 0.75)
STD = (0.5, 0.5, 0.5)


def _denorm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.mark.parametrize("mode", ["pad", "resize"])
@pytest.mark.parametrize("size", [(40, 20), (20, 40), (16, 16), (3, 100)])
def test_output_shape_and_dtype(mode: str, size: tuple[int, int]) -> None:
    out = ImageTransform(32, MEAN, STD, mode=mode)(Image.new("RGB", size, (10, 200, 30)))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32


def test_pad_mode_pads_with_mean_colour_and_keeps_content_centred() -> None:
    # A wide white image: pad mode adds mean-coloured bands on top and bottom.
    out = ImageTransform(32, MEAN, STD, mode="pad")(Image.new("RGB", (64, 32), (255, 255, 255)))
    assert out[:, 0, :].abs().max() < 0.02  # mean colour normalises to ~0
    assert out[:, -1, :].abs().max() < 0.02
    centre = _denorm(out)[:, 16, :]
    assert torch.allclose(centre, torch.ones_like(centre), atol=0.02)  # white content kept


def test_resize_mode_stretches_without_padding() -> None:
    out = ImageTransform(32, MEAN, STD, mode="resize")(Image.new("RGB", (64, 32), (255, 0, 0)))
    pixels = _denorm(out)
    assert torch.allclose(pixels[0], torch.ones(32, 32), atol=0.02)  # red everywhere
    assert pixels[1].abs().max() < 0.02


def test_normalisation_uses_mean_and_std() -> None:
    out = ImageTransform(8, MEAN, STD, mode="resize")(Image.new("RGB", (8, 8), (255, 0, 255)))
    expected = (torch.tensor([1.0, 0.0, 1.0]) - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    image = Image.new(mode, (10, 6))
    assert to_rgb(image).mode == "RGB"
    assert ImageTransform(16, MEAN, STD)(image).shape == (3, 16, 16)


def test_grayscale_gives_equal_channels() -> None:
    rgb = to_rgb(Image.new("L", (4, 4), 77))
    assert rgb.getpixel((0, 0)) == (77, 77, 77)


def test_transparent_pixels_take_the_background_not_hidden_colour() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(image, background=(1, 2, 3)).getpixel((0, 0)) == (1, 2, 3)
    opaque = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    assert to_rgb(opaque, background=(1, 2, 3)).getpixel((0, 0)) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped() -> None:
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 60000)
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_oversize_image_is_downscaled_not_refused() -> None:
    transform = ImageTransform(16, MEAN, STD, max_pixels=64 * 64)
    big = Image.new("RGB", (400, 100), (0, 0, 255))
    bounded = transform.bound(big)
    assert bounded.size[0] * bounded.size[1] <= 64 * 64
    assert abs(bounded.size[0] / bounded.size[1] - 4.0) < 0.2  # aspect ratio kept
    assert transform(big).shape == (3, 16, 16)
    small = Image.new("RGB", (10, 10))
    assert transform.bound(small) is small


def test_invalid_arguments_fail_with_names() -> None:
    with pytest.raises(ValueError, match="pad"):
        ImageTransform(16, MEAN, STD, mode="crop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels"):
        ImageTransform(64, MEAN, STD, max_pixels=100)
    with pytest.raises(ValueError, match="std"):
        ImageTransform(16, MEAN, (0.0, 1.0, 1.0))


def test_batch_normalisation_gives_exactly_the_per_image_floats() -> None:
    transform = ImageTransform(12, MEAN, STD, mode="pad")
    images = [Image.new("RGB", (9 + i, 12), (40 * i, 200 - 30 * i, 7 * i)) for i in range(4)]
    images[1].putpixel((3, 3), (255, 0, 128))
    raw = torch.stack([transform.to_uint8(im) for im in images])
    assert raw.dtype == torch.uint8 and raw.shape == (4, 3, 12, 12)
    batched = transform.normalize(raw)
    assert batched.dtype == torch.float32
    assert torch.equal(batched, torch.stack([transform(im) for im in images]))  # bitwise


def test_normalize_refuses_pixels_that_are_not_uint8() -> None:
    transform = ImageTransform(8, MEAN, STD)
    with pytest.raises(TypeError, match="uint8"):
        transform.normalize(transform(Image.new("RGB", (8, 8))))
