"""The inputs of a model's QnA layers, read during an ordinary forward pass.

A Flax method interceptor records what every QnA layer is called with (its input after the
block's LayerNorm, and the padding mask at its resolution) and its settings, without touching
the model: the forward pass and its outputs are exactly those of `model.apply`.
"""
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qna_detr.layers.qna import QnA

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QnALayer:
  """A QnA layer of a model: its name (parameter path) and settings."""
  name: str
  heads: int
  kernel_size: int
  stride: int
  num_queries: int  # Query parameters (num_queries * upsample^2 of the module).
  normalize_queries: bool

  @property
  def short_name(self) -> str:
    """'stage1_qna1' for 'backbone/stage1_qna1/mixer'."""
    return self.name.removeprefix('backbone/').removesuffix('/mixer')


def layer_params(params: Mapping[str, Any], name: str) -> Mapping[str, Any]:
  """The parameter subtree of the layer called `name`."""
  for key in name.split('/'):
    params = params[key]
  return params


def _interceptor(records: dict[str, tuple[Array, Any]], layers: dict[str, QnALayer]):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, QnA) and context.method_name == '__call__':
      name = '/'.join(module.scope.path)
      x = args[0] if args else kwargs['x']
      mask = args[1] if len(args) > 1 else kwargs.get('padding_mask')
      records[name] = (x, mask)
      layers[name] = QnALayer(name, module.heads, module.kernel_size, module.stride,
                              module.num_queries * module.upsample ** 2,
                              module.normalize_queries)
    return next_fun(*args, **kwargs)
  return intercept


def apply_with_qna_inputs(model: nn.Module, params: Any, images: Array, padding_mask: Array,
                          layers: dict[str, QnALayer] | None = None) -> tuple[Any, dict]:
  """model.apply (eval mode), plus {layer name: (input, padding mask)} of every QnA layer.

  Traceable (jit it); `layers`, if given, is filled with the layers' settings while tracing.
  """
  records: dict[str, tuple[Array, Any]] = {}
  with nn.intercept_methods(_interceptor(records, {} if layers is None else layers)):
    outputs = model.apply({'params': params}, images, padding_mask, train=False)
  return outputs, records


def describe_layers(model: nn.Module, params: Any, image_shape: tuple[int, int] = (64, 64)
                    ) -> dict[str, QnALayer]:
  """The model's QnA layers in call order, found by tracing a forward pass (no compute)."""
  layers: dict[str, QnALayer] = {}
  images = jax.ShapeDtypeStruct((1, *image_shape, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, *image_shape), jnp.bool_)
  jax.eval_shape(lambda p, x, m: apply_with_qna_inputs(model, p, x, m, layers)[1],
                 params, images, mask)
  return layers


def make_capture_fn(model: nn.Module) -> Callable:
  """A jitted (params, images, padding_mask) -> (outputs, QnA inputs)."""
  return jax.jit(lambda p, x, m: apply_with_qna_inputs(model, p, x, m))


def select_layer(layers: Mapping[str, QnALayer], spec: str) -> QnALayer:
  """The layer named by `spec`: its index, its name, a component of it ('stage1_qna1') or a
  unique part of it; otherwise an error naming --layer and listing the choices."""
  names = list(layers)
  if spec.lstrip('-').isdigit() and -len(names) <= int(spec) < len(names):
    return layers[names[int(spec)]]
  matches = ([n for n in names if n == spec] or [n for n in names if spec in n.split('/')]
             or [n for n in names if spec and spec in n])
  if len(matches) != 1:
    problem = 'matches several QnA layers' if matches else 'is not a QnA layer of this model'
    raise ValueError(f'--layer={spec} {problem}; choose an index 0..{len(names) - 1} or one of '
                     f'{[layers[n].short_name for n in names]}.')
  return layers[matches[0]]


def select_heads(layer: QnALayer, spec: Sequence[str]) -> list[int]:
  """Head indices from ['all'] or ['0', '3']; otherwise an error naming --head."""
  spec = list(spec)
  if spec == ['all']:
    return list(range(layer.heads))
  if not spec or not all(s.isdigit() and int(s) < layer.heads for s in spec):
    raise ValueError(f'--head={",".join(spec)}: {layer.short_name} has heads 0..'
                     f'{layer.heads - 1}; give a comma-separated list of them or "all".')
  return [int(s) for s in spec]


def check_query(layer: QnALayer, query: int) -> int:
  """`query` if the layer has it; otherwise an error naming --query."""
  if not 0 <= query < layer.num_queries:
    raise ValueError(f'--query={query}: {layer.short_name} has learned queries '
                     f'0..{layer.num_queries - 1}.')
  return query
