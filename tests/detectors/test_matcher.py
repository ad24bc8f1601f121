"""Hungarian matching: optimality against brute force, validity, costs, and use under jit."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qna_detr.detectors.matcher import SOLVERS, HungarianMatcher, match_cost


def brute_force_cost(cost: np.ndarray, valid: np.ndarray) -> float:
  """Lowest total cost of giving every valid target its own query, by enumeration."""
  targets = np.flatnonzero(valid)
  return min((sum(cost[q, t] for q, t in zip(queries, targets)) for queries in
              itertools.permutations(range(cost.shape[0]), len(targets))), default=0.0)


def check_partial_permutation(match: np.ndarray, valid: np.ndarray) -> None:
  matched_targets = match[match >= 0]
  assert sorted(matched_targets.tolist()) == np.flatnonzero(valid).tolist()
  assert match.min() >= -1 and match.max() < len(valid)


def matched_cost(cost: np.ndarray, match: np.ndarray) -> float:
  queries = np.flatnonzero(match >= 0)
  return float(cost[queries, match[queries]].sum())


# (queries, padded targets): square, rectangular, a single pair, all queries matched.
SHAPES = [(1, 1), (3, 2), (4, 4), (5, 5), (6, 6), (7, 3), (6, 1), (3, 3)]


@pytest.mark.parametrize('solver', sorted(SOLVERS))
@pytest.mark.parametrize('num_queries,num_targets', SHAPES)
def test_optimal_against_brute_force(solver, num_queries, num_targets):
  rng = np.random.default_rng(num_queries * 10 + num_targets)
  batch = 24
  cost = rng.normal(size=(batch, num_queries, num_targets)).astype(np.float32)
  cost[: batch // 2] = np.round(cost[: batch // 2])  # Many ties.
  valid = rng.random((batch, num_targets)) < 0.75
  valid[0] = True  # at least one fully valid and one empty image
  valid[-1] = False
  match = np.asarray(jax.jit(SOLVERS[solver])(jnp.asarray(cost), jnp.asarray(valid)))
  assert match.shape == (batch, num_queries) and match.dtype == np.int32
  for b in range(batch):
    check_partial_permutation(match[b], valid[b])
    assert matched_cost(cost[b], match[b]) == pytest.approx(
        brute_force_cost(cost[b], valid[b]), abs=1e-4)


def test_solvers_agree_on_detr_sized_problems():
  rng = np.random.default_rng(0)
  cost = rng.random((4, 100, 100)).astype(np.float32)
  valid = np.arange(100)[None, :] < np.array([[100], [37], [1], [0]])
  matches = {name: np.asarray(jax.jit(solve)(jnp.asarray(cost), jnp.asarray(valid)))
             for name, solve in SOLVERS.items()}
  for b in range(4):
    for match in matches.values():
      check_partial_permutation(match[b], valid[b])
    assert matched_cost(cost[b], matches['jax'][b]) == pytest.approx(
        matched_cost(cost[b], matches['scipy'][b]), rel=1e-5)


def test_match_cost_hand_value():
  # Class probabilities (0.5, 0.25, 0.25); target class 1; boxes differ by 0.1 in cx.
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
  pred = jnp.array([[[0.5, 0.5, 0.2, 0.2]]])
  target = jnp.array([[[0.6, 0.5, 0.2, 0.2]]])
  # Overlap 0.1 x 0.2 = 0.02, union 0.06, hull 0.3 x 0.2 = 0.06: GIoU = 1/3.
  expected = -0.25 + 5 * 0.1 + 2 * -(1 / 3)
  cost = match_cost(logits, pred, target, jnp.array([[1]]))
  np.testing.assert_allclose(cost, [[[expected]]], atol=1e-5)
  cost = match_cost(logits, pred, target, jnp.array([[1]]), cost_class=2, cost_bbox=0,
                    cost_giou=0)
  np.testing.assert_allclose(cost, [[[-0.5]]], atol=1e-6)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_matcher_recovers_a_permutation_under_jit(solver):
  # Queries 0..3 predict targets (2, 0, padding, 1) exactly; query 4 predicts nothing useful.
  boxes = jnp.array([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.2], [0.4, 0.8, 0.3, 0.1],
                      [0.0, 0.0, 0.0, 0.0]]])
  labels = jnp.array([[0, 2, 1, 0]])
  box_mask = jnp.array([[True, True, True, False]])
  order = jnp.array([2, 0, 3, 1, 3])
  pred_boxes = boxes[:, order].at[:, 4].set(jnp.array([0.9, 0.9, 0.05, 0.05]))
  pred_logits = 5 * jax.nn.one_hot(labels[:, order], 4)
  targets = {'boxes': boxes, 'labels': labels, 'box_mask': box_mask}
  outputs = {'pred_logits': pred_logits, 'pred_boxes': pred_boxes}
  match = jax.jit(HungarianMatcher(solver=solver))(outputs, targets)
  np.testing.assert_array_equal(match, [[2, 0, -1, 1, -1]])


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_non_finite_predictions_still_give_a_valid_matching(solver):
  outputs = {'pred_logits': jnp.full((1, 3, 3), jnp.nan), 'pred_boxes': jnp.full((1, 3, 4), 0.5)}
  targets = {'boxes': jnp.full((1, 2, 4), 0.5), 'labels': jnp.zeros((1, 2), jnp.int32),
             'box_mask': jnp.array([[True, True]])}
  match = np.asarray(jax.jit(HungarianMatcher(solver=solver))(outputs, targets))
  check_partial_permutation(match[0], np.array([True, True]))


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match='solver'):
    HungarianMatcher(solver='auction')
  outputs = {'pred_logits': jnp.zeros((1, 2, 3)), 'pred_boxes': jnp.zeros((1, 2, 4))}
  targets = {'boxes': jnp.zeros((1, 3, 4)), 'labels': jnp.zeros((1, 3), jnp.int32),
             'box_mask': jnp.ones((1, 3), bool)}
  with pytest.raises(ValueError, match='N=3'):
    HungarianMatcher()(outputs, targets)
  fitting = jax.tree.map(lambda x: x[:, :2], targets)
  HungarianMatcher()(outputs, fitting)
  with pytest.raises(ValueError, match='batch_axis'):  # no mesh is set
    HungarianMatcher(batch_axis='data')(outputs, fitting)


@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_solvers_reject_unsolvable_shapes(solver):
  with pytest.raises(ValueError, match='N=4'):
    SOLVERS[solver](jnp.zeros((1, 3, 4)), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match='box_mask'):
    SOLVERS[solver](jnp.zeros((1, 3, 2)), jnp.ones((1, 3), bool))
