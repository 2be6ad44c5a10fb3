"""Deterministic synthetic image-caption pairs: colored shapes, no download needed.

`sample_images(n, seed)` -> (list of PIL images, captions) such as "two red circles left of a blue square".
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _plural(n: int, word: str) -> str:
    return f"{COUNTS[n]} {word}{'s' if n > 1 else ''}"


def make_scene(rng: random.Random, size: int = 224) -> tuple[Image.Image, str, dict]:
    """One image: a group of 1-3 identical shapes on the left, one shape on the right. Returns the
    image, its caption and the facts behind it (left_color, left_shape, count, right_color,
    right_shape)."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    (c1, c2), (s1, s2) = rng.sample(list(COLORS), 2), (rng.choice(SHAPES), rng.choice(SHAPES))
    n = rng.randint(1, 3)
    cell = size // 4
    for i in range(n):
        x = rng.randint(4, size // 2 - cell - 4)
        y = 8 + i * (size - 16) // 3 + rng.randint(0, 8)
        _draw(draw, s1, (x, y, x + cell - 8, y + cell - 8), COLORS[c1])
    x = rng.randint(size // 2 + 8, size - cell - 4)
    y = rng.randint(8, size - cell - 8)
    _draw(draw, s2, (x, y, x + cell, y + cell), COLORS[c2])
    article = "an" if c2[0] in "aeiou" else "a"
    caption = f"{_plural(n, f'{c1} {s1}')} left of {article} {c2} {s2}"
    facts = {"left_color": c1, "left_shape": s1, "count": n, "right_color": c2, "right_shape": s2}
    return img, caption, facts


def make_pair(rng: random.Random, size: int = 224) -> tuple[Image.Image, str]:
    """One image and its caption, e.g. "two red circles left of a blue square"."""
    img, caption, _ = make_scene(rng, size)
    return img, caption


# questions about a scene and the fact that answers each (instruction data for the LLM stage)
QUESTIONS = (
    ("what color is the shape on the right?", lambda f: f["right_color"]),
    ("what shape is on the right?", lambda f: f["right_shape"]),
    ("what color are the shapes on the left?", lambda f: f["left_color"]),
    ("what shape is on the left?", lambda f: f["left_shape"]),
    ("how many shapes are on the left?", lambda f: COUNTS[f["count"]]),
)
QUESTION_WORDS = "what color is the shape shapes on right left are how many"


def make_question(facts: dict, rng: random.Random) -> tuple[str, str]:
    """A question about the scene and its one-word answer."""
    question, answer = rng.choice(QUESTIONS)
    return question, answer(facts)


_NUMBERS = {v: k for k, v in COUNTS.items()}


def parse_caption(text: str) -> dict | None:
    """The facts a caption states, or None when it does not follow the scene grammar
    "<count> <color> <shape>[s] left of a|an <color> <shape>" (case and a final period ignored)."""
    words = text.lower().strip().rstrip(".").split()
    if len(words) != 8 or words[3:5] != ["left", "of"] or words[5] not in ("a", "an"):
        return None
    count, c1, s1, _, _, _, c2, s2 = words
    n = _NUMBERS.get(count)
    if n is None or c1 not in COLORS or c2 not in COLORS or s2 not in SHAPES:
        return None
    if n > 1:
        if not s1.endswith("s") or s1[:-1] not in SHAPES:
            return None
        s1 = s1[:-1]
    elif s1 not in SHAPES:
        return None
    return {"left_color": c1, "left_shape": s1, "count": n, "right_color": c2, "right_shape": s2}


def sample_images(n: int, seed: int = 0, size: int = 224) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    pairs = [make_pair(rng, size) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def caption_scores(preds: list[str], truth: list[str]) -> dict[str, float]:
    """Exact match, and the share where every object's color and shape are right (scene grammar)."""

    def norm(t: str) -> str:
        return " ".join(t.lower().replace(".", " ").split())

    def objects_ok(p: str, t: str) -> bool:
        a, b = parse_caption(p), parse_caption(t)
        keys = ("left_color", "left_shape", "right_color", "right_shape")
        return a is not None and b is not None and all(a[k] == b[k] for k in keys)

    n = max(len(truth), 1)
    return {
        "val_caption_exact": sum(norm(p) == norm(t) for p, t in zip(preds, truth)) / n,
        "val_caption_objects_ok": sum(objects_ok(p, t) for p, t in zip(preds, truth)) / n,
    }
