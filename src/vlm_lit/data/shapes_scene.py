"""The shapes world's scenes: coloured shapes on a 3x3 grid, sampled and drawn with PIL."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses"}  # fmt: skip
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
       "yellow": (235, 215, 40), "purple": (160, 60, 210), "white": (240, 240, 240)}  # fmt: skip
SIZES = ("small", "large")
# Row-major names of the 3x3 cells; single tokens so VQA answers are one word.
POSITIONS = ("top-left", "top", "top-right", "left", "center", "right",
             "bottom-left", "bottom", "bottom-right")  # fmt: skip
# A mild popularity prior (earlier names more frequent) so POPE "popular" negatives mean
# something: they are the absent objects the model saw most often in training.
SHAPE_PRIOR = (1.6, 1.3, 1.0, 0.8, 0.6)
COLOR_PRIOR = (1.6, 1.4, 1.2, 1.0, 0.8, 0.6)
BACKGROUND = (24, 24, 28)
MAX_OBJECTS = 5


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell; `dx`, `dy` jitter the centre by a few pixels."""

    shape: str
    color: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape} {self.position}"


@dataclass(frozen=True)
class Scene:
    """A scene: objects in distinct cells, kept in row-major cell order."""

    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        """E.g. `"small red circle top-left , large blue square center"`."""
        return " , ".join(o.describe() for o in self.objects)

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(
            (shape is None or o.shape == shape) and (color is None or o.color == color)
            for o in self.objects
        )

    def names(self) -> set[str]:
        return {o.name for o in self.objects}


def object_prior() -> dict[str, float]:
    """Unnormalised prior weight of every "colour shape" name (colour x shape prior)."""
    return {
        f"{color} {shape}": pc * ps
        for color, pc in zip(COLORS, COLOR_PRIOR, strict=True)
        for shape, ps in zip(SHAPES, SHAPE_PRIOR, strict=True)
    }


def sample_scene(rng: random.Random, num_objects: int | None = None) -> Scene:
    """Draw 1-5 objects (or `num_objects`) with the popularity prior, one per cell."""
    n = num_objects if num_objects is not None else rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))
    objects = tuple(
        SceneObject(
            shape=rng.choices(SHAPES, SHAPE_PRIOR)[0],
            color=rng.choices(COLORS, COLOR_PRIOR)[0],
            size=rng.choice(SIZES),
            cell=cell,
            dx=round(rng.uniform(-1.0, 1.0), 3),
            dy=round(rng.uniform(-1.0, 1.0), 3),
        )
        for cell in cells
    )
    return Scene(objects)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    t = r / 3  # cross: a plus sign with arms one third of the radius thick
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]  # fmt: skip


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of `image_size` x `image_size` pixels."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        radius = cell * (0.40 if obj.size == "large" else 0.24)
        slack = cell / 2 - radius - 1  # jitter never pushes a shape out of its cell
        cx = (col + 0.5) * cell + obj.dx * slack
        cy = (row + 0.5) * cell + obj.dy * slack
        fill = RGB[obj.color]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon(_outline(obj.shape, cx, cy, radius), fill=fill)
    return image
