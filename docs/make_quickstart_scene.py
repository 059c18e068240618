"""A scene for the README's zero-shot example: one shape of each of ``make run``'s six classes on a noisy background.

    make run          # trains work_dirs/quickstart/train/latest.pt (its inductive stage; ~24 s in all on 2 cores)
    python docs/make_quickstart_scene.py --out /tmp/qs/scene.png
    cascade-clip predict --checkpoint work_dirs/quickstart/train/latest.pt \
        --classes "dark red,light green,dark blue,light red,dark green,light blue" /tmp/qs/scene.png \
        --out /tmp/qs/seg --short-side 128

(The checkpoint embeds exactly these six names, with the class embeddings stored in it: other names would need the
text tower of its random-weight CLIP.)

The shapes use the colours of :mod:`cascade_clip.synthetic` (a shade and a hue per class), drawn larger than the
training images show them, in a fixed layout: top row dark red, light green, dark blue; bottom row light red, then
the two unseen classes, dark green and light blue.
"""

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from cascade_clip.synthetic import CLASS_NAMES, class_colour

WIDTH, HEIGHT = 288, 192


def _cells():
    """Per class, its shape's box (x0, y0, x1, y1): a 3 x 2 grid, classes in order, row by row."""
    cell_w, cell_h = WIDTH // 3, HEIGHT // 2
    for index in range(len(CLASS_NAMES)):
        row, col = divmod(index, 3)
        x0, y0 = col * cell_w + 12, row * cell_h + 12
        yield x0, y0, x0 + cell_w - 24, y0 + cell_h - 24


def shape_centres():
    """(row, column) of each class's shape centre, in class order."""
    return [((y0 + y1) // 2, (x0 + x1) // 2) for x0, y0, x1, y1 in _cells()]


def draw_scene(seed: int = 0) -> Image.Image:
    """The scene as an RGB image: each class's shape filled with its colour plus the training data's noise."""
    rng = np.random.default_rng(seed)
    background = rng.uniform(90, 160, size=3) + rng.normal(0, 18, size=(HEIGHT, WIDTH, 3))
    image = background.copy()
    for index, (x0, y0, x1, y1) in enumerate(_cells()):
        mask_image = Image.new("L", (WIDTH, HEIGHT), 0)
        draw = ImageDraw.Draw(mask_image)
        if index % 3 == 0:
            draw.ellipse([x0, y0, x1, y1], fill=255)
        elif index % 3 == 1:
            draw.rectangle([x0 + 6, y0 + 6, x1 - 6, y1 - 6], fill=255)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=255)
        mask = np.asarray(mask_image) > 0
        fill = np.asarray(class_colour(index), dtype=np.float64) + rng.normal(0, 10, size=(HEIGHT, WIDTH, 3))
        image[mask] = fill[mask]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    draw_scene(args.seed).save(args.out)
    print(f"wrote {args.out} ({WIDTH}x{HEIGHT}; classes {', '.join(CLASS_NAMES)})")


if __name__ == "__main__":
    main()
