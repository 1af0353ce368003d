"""Instruction pools shared by the shapes world and the caption converters."""

from __future__ import annotations

import random

# Caption instructions drawn per sample (seeded) for caption pairs, as POINTS-1.5 does for
# its pre-training captions, so the model does not tie captioning to one literal prompt.
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Write a short caption for this image.",
    "What is shown in the image?",
    "Give a brief description of the picture.",
    "Summarize the visual content of the image.",
    "Provide a one-sentence caption.",
    "Describe this picture in a few words.",
    "What does this image contain?",
)

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


def pick_caption_prompt(rng: random.Random, pool: tuple[str, ...] = CAPTION_PROMPTS) -> str:
    """One prompt from `pool`, chosen by `rng` (callers seed it per sample)."""
    if not pool:
        raise ValueError("the caption prompt pool is empty; give at least one prompt")
    return pool[rng.randrange(len(pool))]
