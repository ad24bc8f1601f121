"""Rendering with PIL (matplotlib only for its colour maps): boxes, heatmaps, tile grids."""
from collections.abc import Sequence
import math

from matplotlib import colormaps
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (matplotlib's tab10), cycled by class label.
PALETTE = tuple(tuple(int(round(255 * c)) for c in colormaps['tab10'](i)[:3]) for i in range(10))


def font(size: int = 12) -> ImageFont.ImageFont:
  return ImageFont.load_default(size=size)


def class_colour(label: int) -> tuple[int, int, int]:
  return PALETTE[int(label) % len(PALETTE)]


def draw_boxes(image: Image.Image, boxes: np.ndarray, texts: Sequence[str],
               colours: Sequence[tuple[int, int, int]]) -> Image.Image:
  """A copy of `image` with COCO (x, y, width, height) pixel boxes, each captioned (unless
  its text is empty)."""
  image = image.convert('RGB')
  draw = ImageDraw.Draw(image)
  line = max(1, round(min(image.size) / 200))
  text_font = font(max(10, round(min(image.size) / 40)))
  for (x, y, w, h), text, colour in zip(np.asarray(boxes, np.float64).reshape(-1, 4), texts,
                                        colours):
    draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
    if not text:
      continue
    left, top, right, bottom = draw.textbbox((x, y), text, font=text_font)
    # Caption above the box, or inside it where the box touches the top edge.
    shift = (bottom - top + 2) if y - (bottom - top + 2) >= 0 else -line
    draw.rectangle([left, top - shift, right + 2, bottom - shift], fill=colour)
    draw.text((x + 1, y - shift), text, fill=(255, 255, 255), font=text_font)
  return image


def draw_detections(image: Image.Image, detections: dict[str, np.ndarray],
                    class_names: Sequence[str], threshold: float) -> Image.Image:
  """Boxes of one image's post-processed detections (a detector's post-processing) that
  score at least `threshold`, captioned 'class score'."""
  keep = np.asarray(detections['scores']) >= threshold
  labels = np.asarray(detections['labels'])[keep]
  texts = [f'{class_names[label]} {score:.2f}'
           for label, score in zip(labels, np.asarray(detections['scores'])[keep])]
  return draw_boxes(image, np.asarray(detections['boxes'])[keep], texts,
                    [class_colour(label) for label in labels])


def colourize(values: np.ndarray, cmap: str = 'jet', vmin: float | None = None,
              vmax: float | None = None) -> np.ndarray:
  """[h, w] floats -> [h, w, 3] uint8 through a matplotlib colour map, clipped to
  [vmin, vmax] (default: the values' range)."""
  values = np.asarray(values, np.float64)
  vmin = float(values.min()) if vmin is None else vmin
  vmax = float(values.max()) if vmax is None else vmax
  scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  return (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def map_to_image(values: np.ndarray, cell: int, size: tuple[int, int],
                 orig_size: tuple[int, int]) -> np.ndarray:
  """A feature-map-grid map -> the original image's pixel grid (bilinear).

  values: [Hl, Wl] on a grid whose cell (i, j) covers the resized image's pixels
  [cell * i, cell * (i + 1)) x [cell * j, cell * (j + 1)) (the backbone's padded strides);
  size: the resized image's unpadded (height, width); orig_size: the original's. Cells on
  padding are dropped first, so that they do not blur into the image's edge.
  """
  height, width = (-(-int(n) // cell) for n in size)
  grid = Image.fromarray(np.asarray(values, np.float32)[:height, :width], mode='F')
  resized = grid.resize((width * cell, height * cell), Image.Resampling.BILINEAR)
  resized = resized.crop((0, 0, int(size[1]), int(size[0])))
  return np.asarray(resized.resize((int(orig_size[1]), int(orig_size[0])),
                                   Image.Resampling.BILINEAR))


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.5,
            cmap: str = 'jet') -> Image.Image:
  """`heat` ([h, w], the image's size) colour-mapped over its range and blended in."""
  colours = Image.fromarray(colourize(heat, cmap))
  return Image.blend(image.convert('RGB'), colours, alpha)


def with_caption(image: Image.Image, text: str, size: int = 12) -> Image.Image:
  """`image` below a white strip holding `text` (one line per '\\n')."""
  text_font = font(size)
  probe = ImageDraw.Draw(image)
  _, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=text_font)
  out = Image.new('RGB', (max(image.width, right + 4), image.height + bottom + 4),
                  (255, 255, 255))
  ImageDraw.Draw(out).multiline_text((2, 2), text, fill=(0, 0, 0), font=text_font)
  out.paste(image.convert('RGB'), (0, bottom + 4))
  return out


def grid(tiles: Sequence[Image.Image], columns: int, gap: int = 4) -> Image.Image:
  """Tiles (any sizes) row by row on a white canvas, each in a cell of the largest size."""
  if not tiles:
    raise ValueError('grid() needs at least one tile.')
  cell_w = max(t.width for t in tiles)
  cell_h = max(t.height for t in tiles)
  columns = max(1, min(columns, len(tiles)))
  rows = math.ceil(len(tiles) / columns)
  out = Image.new('RGB', (columns * (cell_w + gap) - gap, rows * (cell_h + gap) - gap),
                  (255, 255, 255))
  for index, tile in enumerate(tiles):
    row, col = divmod(index, columns)
    out.paste(tile.convert('RGB'), (col * (cell_w + gap), row * (cell_h + gap)))
  return out


def kernel_tile(kernel: np.ndarray, cmap: str, vmin: float, vmax: float,
                pixels: int) -> Image.Image:
  """A [k, k] kernel as a colour-mapped square, each entry `pixels` wide (nearest)."""
  tile = Image.fromarray(colourize(kernel, cmap, vmin, vmax))
  return tile.resize((kernel.shape[1] * pixels, kernel.shape[0] * pixels),
                     Image.Resampling.NEAREST)


def enlarge(image: Image.Image, min_side: int) -> Image.Image:
  """Integer nearest-neighbour upscaling until the shorter side reaches `min_side`."""
  factor = max(1, math.ceil(min_side / min(image.size)))
  return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
