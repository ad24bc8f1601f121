"""The pictures of tools/visualize.py, one function each, for one image and one QnA layer.

- detections: post-processed boxes with class names and scores, in original image pixels.
- attention (supplement, Figure 1): for a head and a learned query, the sum over every window
  that contains a pixel of the softmax weight that window puts on it, upsampled to the image
  and overlaid as a heatmap.
- kernels (supplement, Figure 2): the k x k softmax weights of every window, tiled (not
  overlapped) at the window's place, next to the image.
- kernel parameters: per query and head, softmax(B) over the window (the content-free part
  of every kernel) and the attention scale weights Ws, which multiply the numerator only.

Pictures are scaled up by an integer factor until their shorter side reaches `min_side`.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from PIL import Image

from qna_detr.visualization import attention
from qna_detr.visualization import drawing
from qna_detr.visualization.capture import QnALayer
from qna_detr.visualization.inputs import Example


def scale_factor(orig_size: Sequence[int], min_side: int) -> int:
  return max(1, math.ceil(min_side / max(1, min(orig_size))))


def _picture(example: Example, factor: int) -> Image.Image:
  width, height = example.picture.size
  return example.picture.resize((width * factor, height * factor), Image.Resampling.BILINEAR)


def cell_size(network_shape: Sequence[int], layer_shape: Sequence[int]) -> int:
  """Input pixels per layer-grid cell: the power of two s with ceil(H / s) = Hl (and W)."""
  cell = 1
  while cell <= max(network_shape):
    if all(-(-n // cell) == m for n, m in zip(network_shape, layer_shape)):
      return cell
    cell *= 2
  raise ValueError(f'A layer grid of {tuple(layer_shape)} is not a power-of-two stride of the '
                   f'input {tuple(network_shape)}.')


def detections_figure(example: Example, detections: Mapping[str, np.ndarray],
                      class_names: Sequence[str], threshold: float,
                      min_side: int = 0) -> Image.Image:
  """Boxes scoring >= threshold; detections of this image as `postprocess` returns them."""
  factor = scale_factor(example.orig_size, min_side)
  scaled = {**detections, 'boxes': np.asarray(detections['boxes']) * factor}
  return drawing.draw_detections(_picture(example, factor), scaled, class_names, threshold)


@dataclasses.dataclass(frozen=True)
class LayerInput:
  """What one QnA layer saw for one image (a batch of one)."""
  layer: QnALayer
  shape: tuple[int, int]  # (Hl, Wl) of the layer's input grid.
  padding_mask: np.ndarray | None  # [1, Hl, Wl], True = padding.
  weights: np.ndarray  # [Ho, Wo, k, k, Q, h] window softmax weights.


def layer_input(layer: QnALayer, params: Mapping[str, Any], x: jax.Array,
                padding_mask: jax.Array | None) -> LayerInput:
  """The window softmax weights of the layer for its input x ([1, Hl, Wl, C], after the
  block's LayerNorm) and padding mask ([1, Hl, Wl] or None)."""
  weights = attention.window_weights(x, padding_mask, params, heads=layer.heads,
                                     stride=layer.stride,
                                     normalize_queries=layer.normalize_queries)
  mask = None if padding_mask is None else np.asarray(padding_mask)
  return LayerInput(layer, tuple(x.shape[1:3]), mask, np.asarray(weights[0]))


def attention_figure(example: Example, seen: LayerInput, heads: Sequence[int], query: int,
                     min_side: int = 0) -> Image.Image:
  """Per head, the summed window weights of every pixel (Figure 1) over the picture."""
  layer = seen.layer
  maps = np.asarray(attention.attention_map(seen.weights[None], *seen.shape, layer.stride,
                                            seen.padding_mask)[0])
  cell = cell_size(example.inputs.shape[1:3], seen.shape)
  factor = scale_factor(example.orig_size, min_side)
  picture = _picture(example, factor)
  shown = (picture.height, picture.width)
  tiles = []
  for head in heads:
    heat = drawing.map_to_image(maps[..., query, head], cell, example.size, shown)
    tiles.append(drawing.with_caption(
        drawing.overlay(picture, heat),
        f'{layer.short_name} head {head} query {query}\n'
        f'max {heat.max():.2f} (sum of window weights)'))
  return drawing.grid(tiles, columns=math.ceil(math.sqrt(len(tiles))))


def _valid_windows(example: Example, seen: LayerInput) -> tuple[int, int]:
  """Windows centred on the resized image (not on padding), per axis."""
  cell = cell_size(example.inputs.shape[1:3], seen.shape)
  return tuple(-(-(-(-int(n) // cell)) // seen.layer.stride) for n in example.size)


def kernels_figure(example: Example, seen: LayerInput, heads: Sequence[int], query: int,
                   min_side: int = 0) -> Image.Image:
  """The picture, then per head the mosaic of every window's k x k weights (Figure 2)."""
  layer = seen.layer
  rows, cols = _valid_windows(example, seen)
  k = layer.kernel_size
  mosaics = [attention.window_mosaic(seen.weights[:rows, :cols, :, :, query, head])
             for head in heads]
  images = [drawing.enlarge(Image.fromarray(drawing.colourize(m, 'inferno', 0.0)), min_side)
            for m in mosaics]
  picture = example.picture.resize(images[0].size, Image.Resampling.BILINEAR)
  tiles = [drawing.with_caption(picture, f'image {example.name}\n{rows} x {cols} windows')]
  for head, mosaic, image in zip(heads, mosaics, images):
    tiles.append(drawing.with_caption(
        image, f'{layer.short_name} head {head} query {query}\n'
               f'{k} x {k} weights: black 0, yellow {mosaic.max():.2f}'))
  return drawing.grid(tiles, columns=math.ceil(math.sqrt(len(tiles))))


def kernel_parameters_figure(layer: QnALayer, params: Mapping[str, Any],
                             pixels: int = 16) -> Image.Image:
  """Per query (rows) and head (columns): softmax(B) over the window, and Ws."""
  panels = []
  for title, kernels, cmap, low, high in _parameter_panels(params):
    tiles = [drawing.with_caption(
        drawing.kernel_tile(kernels[:, :, q, h], cmap, low, high, pixels), f'q{q} h{h}', 10)
             for q in range(kernels.shape[2]) for h in range(kernels.shape[3])]
    panels.append(drawing.with_caption(
        drawing.grid(tiles, columns=kernels.shape[3]),
        f'{layer.short_name}: {title}\n{cmap} colour map from {low:.3g} to {high:.3g}', 14))
  return drawing.grid(panels, columns=1, gap=16)


def _parameter_panels(params: Mapping[str, Any]) -> list[tuple[str, np.ndarray, str, float,
                                                                float]]:
  """(title, [k, k, Q, h] kernels, colour map, low, high) of each parameter panel."""
  bias = attention.bias_kernels(params)
  scale = np.asarray(params['attn_scale_weights'], np.float32)
  bound = float(np.abs(scale).max()) or 1.0
  low, high = float(bias.min()), float(bias.max())
  return [('softmax of the relative position bias B over the window', bias, 'inferno',
           low if high > low else 0.0, high),
          ('attention scale weights Ws (numerator only)', scale, 'coolwarm', -bound, bound)]
