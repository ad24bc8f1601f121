"""Hungarian matching of predictions to padded targets, usable inside a jitted train step.

DETR's loss needs, for every image, the one-to-one assignment of object queries to ground-truth
boxes with the lowest total cost `cost_class * class cost + cost_bbox * L1(cxcywh) +
cost_giou * (-GIoU(xyxy))`. The class cost is DETR's -softmax(logits)[class] ('softmax', a
"no object" logit last) or the focal cost of sigmoid scores of Deformable DETR and DINO
('focal': alpha (1 - p)^2 (-log p) - (1 - alpha) p^2 (-log(1 - p)), p = sigmoid(logit)). Targets come padded to a fixed N (<= the number of queries) with a
validity mask; every valid target is matched, padded ones never are. The result has a fixed
shape: for every query, the index of its target, or -1.

Two exact solvers compute the same optimal cost (ties may pick different assignments):

- 'scipy': `scipy.optimize.linear_sum_assignment` on the host through `jax.pure_callback`.
- 'jax': shortest augmenting paths (the Jonker-Volgenant family, as in Crouse 2016) written with
  `lax.while_loop` and vmapped over the batch; it never leaves the device.

'scipy' is the default: the host solve is cheaper than the on-device search, whose loop waits
for the slowest image of the batch at every augmenting step, and `batch_axis` lets every device
solve only its own images (`tools/benchmark_matcher.py` compares the two).
"""
import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from qna_detr.detectors import box_ops

# Stands in for non-finite costs (from non-finite predictions) so that a solver never sees
# NaN or inf; dwarfs any real cost (at most 1 + 4 * 5 + 2 * 2 with the default weights).
_LARGE_COST = 1e6

Solver = Callable[[jax.Array, jax.Array], jax.Array]


CLASS_COSTS = ('softmax', 'focal')


def _class_cost(logits: jax.Array, labels: jax.Array, kind: str, alpha: float) -> jax.Array:
  """[B, Q, N] cost of predicting each target's class."""
  if kind == 'softmax':
    prob = jax.nn.softmax(logits, axis=-1)
    labels = jnp.clip(labels, 0, prob.shape[-1] - 1)
    return -jnp.take_along_axis(prob, labels[:, None, :], axis=-1)
  prob = jax.nn.sigmoid(logits)
  negative = (1 - alpha) * prob ** 2 * -jnp.log(1 - prob + 1e-8)
  positive = alpha * (1 - prob) ** 2 * -jnp.log(prob + 1e-8)
  labels = jnp.clip(labels, 0, prob.shape[-1] - 1)
  return jnp.take_along_axis(positive - negative, labels[:, None, :], axis=-1)


def match_cost(pred_logits: jax.Array, pred_boxes: jax.Array, target_boxes: jax.Array,
               target_labels: jax.Array, *, cost_class: float = 1.0, cost_bbox: float = 5.0,
               cost_giou: float = 2.0, class_cost: str = 'softmax',
               focal_alpha: float = 0.25) -> jax.Array:
  """The matching cost of every (query, target) pair, float32, without gradient.

  Args:
    pred_logits: `[B, Q, C + 1]` ('softmax') or `[B, Q, C]` ('focal').
    pred_boxes: `[B, Q, 4]` normalized cxcywh.
    target_boxes: `[B, N, 4]` normalized cxcywh.
    target_labels: `[B, N]` int in [0, C); padded entries may hold anything.
    cost_class, cost_bbox, cost_giou: weights of the three terms.
    class_cost: 'softmax' or 'focal' (see the module doc), with `focal_alpha`.

  Returns:
    `[B, Q, N]` finite costs.
  """
  pred_logits, pred_boxes, target_boxes = jax.tree.map(
      lambda x: jax.lax.stop_gradient(x).astype(jnp.float32),
      (pred_logits, pred_boxes, target_boxes))
  classes = _class_cost(pred_logits, target_labels, class_cost, focal_alpha)
  l1_cost = jnp.abs(pred_boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
  giou_cost = -box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                                           box_ops.box_cxcywh_to_xyxy(target_boxes))
  cost = cost_class * classes + cost_bbox * l1_cost + cost_giou * giou_cost
  return jnp.nan_to_num(cost, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)


def _check_problem(cost: jax.Array, box_mask: jax.Array) -> None:
  """Both solvers match every valid target, which needs N <= Q."""
  num_queries, num_targets = cost.shape[-2:]
  if box_mask.shape != (*cost.shape[:-2], num_targets):
    raise ValueError(f'box_mask has shape {box_mask.shape}, expected {cost.shape[:-2]} + '
                     f'({num_targets},) for a cost of shape {cost.shape}')
  if num_targets > num_queries:
    raise ValueError(f'targets are padded to N={num_targets} boxes, more than the '
                     f'{num_queries} queries that could match them')


def _scipy_host(cost: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
  """Solves each `[Q, N]` problem of a `[..., Q, N]` batch on the host."""
  batch_shape, (num_queries, num_targets) = cost.shape[:-2], cost.shape[-2:]
  batch = int(np.prod(batch_shape))
  cost = np.asarray(cost).reshape(batch, num_queries, num_targets)
  box_mask = np.asarray(box_mask).reshape(batch, num_targets)
  out = np.full(cost.shape[:2], -1, np.int32)
  for b in range(cost.shape[0]):
    valid = np.flatnonzero(box_mask[b])
    queries, targets = scipy.optimize.linear_sum_assignment(cost[b][:, valid])
    out[b, queries] = valid[targets]
  return out.reshape(*batch_shape, num_queries)


def solve_scipy(cost: jax.Array, box_mask: jax.Array) -> jax.Array:
  """Optimal assignment `[B, Q, N]`, `[B, N]` -> `[B, Q]` int32 via a host callback."""
  _check_problem(cost, box_mask)
  result = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
  return jax.pure_callback(_scipy_host, result, cost, box_mask, vmap_method='broadcast_all')


def _solve_one(cost: jax.Array, valid: jax.Array) -> jax.Array:
  """Shortest-augmenting-path assignment of one `[N, Q]` problem (rows = targets, N <= Q).

  Each valid row is added in turn by a Dijkstra search over reduced costs `c - u - v` for the
  cheapest path to a free column, then the potentials are updated and the path flipped.
  """
  num_rows, num_cols = cost.shape
  unmatched = jnp.full(num_cols, -1, jnp.int32)
  if num_rows == 0:
    return unmatched
  rows = jnp.arange(num_rows)

  def add_row(row: jax.Array, state: tuple) -> tuple:
    u, v, col4row, row4col = state
    active = valid[row]

    def search_step(search: tuple) -> tuple:
      i, min_val, shortest, path, seen_rows, seen_cols, _ = search
      seen_rows = seen_rows.at[i].set(True)
      reduced = min_val + cost[i] - u[i] - v
      better = ~seen_cols & (reduced < shortest)
      path = jnp.where(better, i, path)
      shortest = jnp.where(better, reduced, shortest)
      open_costs = jnp.where(seen_cols, jnp.inf, shortest)
      min_val = open_costs.min()
      ties = open_costs == min_val
      free_ties = ties & (row4col < 0)  # Ending the path at once saves search steps.
      j = jnp.where(free_ties.any(), jnp.argmax(free_ties), jnp.argmax(ties))
      seen_cols = seen_cols.at[j].set(True)
      sink = jnp.where(row4col[j] < 0, j, -1)
      return row4col[j], min_val, shortest, path, seen_rows, seen_cols, sink

    search = (row, jnp.float32(0), jnp.full(num_cols, jnp.inf), jnp.full(num_cols, -1),
              jnp.zeros(num_rows, bool), jnp.zeros(num_cols, bool),
              jnp.where(active, -1, 0))
    _, min_val, shortest, path, seen_rows, seen_cols, sink = jax.lax.while_loop(
        lambda s: s[-1] < 0, search_step, search)

    # Potentials: keep reduced costs non-negative and zero along the matching.
    row_gain = jnp.where(rows == row, min_val,
                         min_val - shortest[jnp.clip(col4row, 0, num_cols - 1)])
    u = u + jnp.where(active & seen_rows, row_gain, 0)
    v = v - jnp.where(active & seen_cols, min_val - shortest, 0)

    def flip_step(flip: tuple) -> tuple:
      j, col4row, row4col, _ = flip
      i = path[j]
      row4col = row4col.at[j].set(i)
      next_j = col4row[i]
      return next_j, col4row.at[i].set(j), row4col, i == row

    _, col4row, row4col, _ = jax.lax.while_loop(
        lambda f: ~f[-1], flip_step, (sink, col4row, row4col, ~active))
    return u, v, col4row, row4col

  state = (jnp.zeros(num_rows), jnp.zeros(num_cols), jnp.full(num_rows, -1),
           jnp.full(num_cols, -1))
  _, _, col4row, _ = jax.lax.fori_loop(0, num_rows, add_row, state)
  matched_cols = jnp.where(valid, col4row, num_cols)  # Out of range: dropped by the scatter.
  return unmatched.at[matched_cols].set(rows, mode='drop')


def solve_jax(cost: jax.Array, box_mask: jax.Array) -> jax.Array:
  """Optimal assignment `[B, Q, N]`, `[B, N]` -> `[B, Q]` int32, on device."""
  _check_problem(cost, box_mask)
  return jax.vmap(_solve_one)(jnp.swapaxes(cost, -1, -2).astype(jnp.float32), box_mask)


SOLVERS: dict[str, Solver] = {'scipy': solve_scipy, 'jax': solve_jax}


@dataclasses.dataclass(frozen=True)
class HungarianMatcher:
  """Matches one layer's predictions to padded targets.

  Attributes:
    cost_class: weight of the negated probability of the target class.
    cost_bbox: weight of the L1 distance between cxcywh boxes.
    cost_giou: weight of the negated generalized IoU.
    solver: 'scipy' or 'jax' (see the module docstring).
    class_cost: 'softmax' or 'focal', with `focal_alpha` (see the module docstring).
    batch_axis: name of the axis of the current mesh (`jax.set_mesh`) that shards the batch.
      With it every device solves its own images; without it, under sharding-based `jit`, the
      host solver has all cost matrices gathered onto one device first.
  """
  cost_class: float = 1.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  solver: Literal['scipy', 'jax'] = 'scipy'
  batch_axis: str | None = None
  class_cost: Literal['softmax', 'focal'] = 'softmax'
  focal_alpha: float = 0.25

  def __post_init__(self):
    if self.solver not in SOLVERS:
      raise ValueError(f'solver must be one of {sorted(SOLVERS)}, got {self.solver!r}')
    if self.class_cost not in CLASS_COSTS:
      raise ValueError(f'class_cost must be one of {CLASS_COSTS}, got {self.class_cost!r}')

  def __call__(self, outputs: Mapping[str, jax.Array],
               targets: Mapping[str, jax.Array]) -> jax.Array:
    """Returns `[B, Q]` int32: each query's matched target index in [0, N), or -1.

    Args:
      outputs: 'pred_logits' `[B, Q, C + 1]` and 'pred_boxes' `[B, Q, 4]`.
      targets: 'boxes' `[B, N, 4]` cxcywh, 'labels' `[B, N]` int, 'box_mask' `[B, N]` bool
        (True = real box), with N <= Q.
    """
    cost = match_cost(outputs['pred_logits'], outputs['pred_boxes'], targets['boxes'],
                      targets['labels'], cost_class=self.cost_class, cost_bbox=self.cost_bbox,
                      cost_giou=self.cost_giou, class_cost=self.class_cost,
                      focal_alpha=self.focal_alpha)
    solve = SOLVERS[self.solver]
    if self.batch_axis is not None:
      mesh = jax.sharding.get_abstract_mesh()
      if self.batch_axis not in mesh.axis_names:
        raise ValueError(f'batch_axis={self.batch_axis!r} is not an axis of the current mesh '
                         f'{mesh.axis_names}; call the matcher under jax.set_mesh(mesh)')
      spec = jax.sharding.PartitionSpec(self.batch_axis)
      solve = jax.shard_map(solve, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    return solve(cost, targets['box_mask'])
