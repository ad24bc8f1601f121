"""The checks a config passes before a run starts: every error names the key.

Generic keys (rates, intervals, sizes, the schedule, the input) are checked here; the detector
and the backbone check the keys they read themselves, through their registry entries
(`detectors.check`).
"""
import ml_collections

from qna_detr import detectors
from qna_detr import parallel
from qna_detr.train import inputs

# (key, test, rule) of the numbers that would fail late (or train backwards) if wrong.
_RULES = (('optimizer.lr', lambda v: v >= 0, '>= 0'),
          ('optimizer.backbone_lr', lambda v: v >= 0, '>= 0'),
          ('optimizer.weight_decay', lambda v: v >= 0, '>= 0'),
          ('optimizer.grad_clip_norm', lambda v: v > 0, '> 0'),
          ('optimizer.warmup_steps', lambda v: v >= 0, '>= 0'),
          ('optimizer.decay_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
          ('log_every_steps', lambda v: v >= 1, '>= 1'),
          ('checkpoint_every_steps', lambda v: v >= 1, '>= 1'),
          ('keep_checkpoints', lambda v: v >= 1, '>= 1'),
          ('ema_decay', lambda v: 0 <= v < 1, 'in [0, 1) (0: no average)'))


def _value(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` (references resolved), checked for what a run cannot start without."""
  config = ml_collections.ConfigDict(config.to_dict())
  detectors.check(config)
  for key, ok, rule in _RULES:
    if not ok(_value(config, key)):
      raise ValueError(f'config.{key}={_value(config, key)} must be {rule}.')
  _check_schedule(config)
  if config.train_input not in inputs.SOURCES:
    raise ValueError(f'config.train_input must be one of {sorted(inputs.SOURCES)}, got '
                     f'{config.train_input!r}.')
  if config.train_input == 'cached_features' and not config.optimizer.freeze_backbone:
    raise ValueError("config.train_input='cached_features' needs "
                     'config.optimizer.freeze_backbone: the features of a backbone that trains '
                     'change every step.')
  parallel.check_batch_size(config.batch_size, 'config.batch_size')
  parallel.check_batch_size(config.eval_batch_size, 'config.eval_batch_size')
  return config


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  """Decays and evaluations inside the run, where the run is counted in epochs (a run of
  `num_train_steps` is checked once its epoch length is known, `optimizer.check_run`)."""
  if config.num_train_steps > 0:
    return
  if config.num_epochs < 1:
    raise ValueError(f'config.num_epochs={config.num_epochs} must be >= 1 (or set '
                     'config.num_train_steps).')
  for epoch in config.optimizer.decay_epochs or ():
    if not 0 < epoch < config.num_epochs:
      raise ValueError(f'config.optimizer.decay_epochs={tuple(config.optimizer.decay_epochs)} '
                       f'must lie inside the run (0, config.num_epochs={config.num_epochs}); '
                       'None decays after config.optimizer.decay_fraction of the run.')
  every = config.eval_every_epochs
  if every is not None and not 0 < every <= config.num_epochs:
    raise ValueError(f'config.eval_every_epochs={every} must be in (0, config.num_epochs='
                     f'{config.num_epochs}] (None: evaluate at the end only).')
