"""The experiment configs that the files in configs/ return (each a Scenic-style get_config()).

Every key of a run is here, with a line on what it is; `--config.KEY=VALUE` overrides any.
"""
import ml_collections
from ml_collections import config_dict

from qna_detr.data import dataset_config


def detr_coco(backbone: str) -> ml_collections.ConfigDict:
  """The paper's DETR recipe (supplement 2.2) on TFDS coco/2017 over a registered backbone."""
  config = ml_collections.ConfigDict()
  config.experiment_name = f'detr_{backbone}_coco'
  config.rng_seed = 0
  config.dataset = dataset_config.default_config()
  config.model = ml_collections.ConfigDict(dict(
      name='detr',  # The detector (qna_detr.detectors registry).
      backbone=backbone,  # The backbone (qna_detr.backbones registry).
      backbone_drop_path=config_dict.placeholder(float),  # QnA-ViT: None = the variant's rate.
      qna_implementation='auto',  # QnA-ViT: qna_detr.layers.qna.IMPLEMENTATIONS.
      num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
      num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, aux_loss=True,
      # Position codes at queries and keys only, as DETR; True also adds them to the input
      # features once (see detectors/detr/model.py).
      position_at_input=False,
      feature_level=-1,  # The backbone level the transformer reads (-1: the last).
      dtype='float32'))  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
  config.matcher = ml_collections.ConfigDict(dict(
      cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
      solver='scipy'))  # 'scipy' (host) or 'jax' (on device).
  config.loss = ml_collections.ConfigDict(dict(ce=1.0, bbox=5.0, giou=2.0, no_object=0.1))
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4, grad_clip_norm=0.1,
      schedule='step',  # 'step': x decay_factor after each of decay_epochs; 'cosine'.
      # Epochs after which the step schedule decays; None: after decay_fraction of the run
      # (2/3: epoch 50 of the paper's 75), so that --config.num_epochs moves the decay.
      decay_epochs=config_dict.placeholder(tuple), decay_fraction=2 / 3, decay_factor=0.1,
      warmup_steps=0,
      freeze_backbone=False))  # True: the backbone's parameters stay fixed (no backward).
  config.pretrained = ml_collections.ConfigDict(dict(
      path='',  # ImageNet checkpoint of the backbone ('' = train from scratch).
      format='auto'))  # backbones.weights.FORMATS.
  # Dense pretraining of the backbone on class maps and box edges before DETR, for data
  # without an ImageNet checkpoint (train/dense_pretraining.py); 0 steps = off.
  config.backbone_pretraining = ml_collections.ConfigDict(dict(
      steps=0, lr=1e-3, warmup_steps=50, weight_decay=1e-4,
      feature_level=-1,  # The backbone level whose sub-cells learn the targets (-1: last).
      upsample=4,  # Sub-cells per feature-map cell side whose targets are learned.
      edge_weight=3.0))  # Of the box edges' L1 loss against the class maps' cross-entropy.
  config.ema_decay = 0.0  # > 0: evaluation reads a moving average of the parameters.
  config.train_input = 'images'  # Or 'cached_features' (frozen backbones; train/inputs.py).
  config.batch_size = 32  # Global, over all devices and processes.
  config.eval_batch_size = 32
  config.num_epochs = 75
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_epochs = 5.0  # None: at the end only.
  config.eval_top_k = 100  # Detections kept per image.
  return config


def detr_resnet50_coco() -> ml_collections.ConfigDict:
  """DETR-R50, DETR's own baseline (Carion et al. 2020): the same recipe over ResNet-50."""
  config = detr_coco('resnet50')
  config.experiment_name = 'detr_resnet50_coco'
  return config


def toy(image_size: int = 128) -> ml_collections.ConfigDict:
  """The synthetic shapes set, made into WORKDIR/toy_coco, sized for a 2-core CPU.

  A nano QnA-ViT pretrains densely on the set (there is no ImageNet checkpoint for it), then
  stays frozen while DETR trains on its cached features.
  """
  config = detr_coco('qna_vit_nano')
  config.experiment_name = 'detr_qna_vit_nano_toy'
  config.toy_data = ml_collections.ConfigDict(dict(
      num_train=8000,  # Enough that the detector does not overfit its training images.
      num_val=1000,  # Enough that the AP of one run is not the luck of a few images.
      image_size=image_size, seed=0,
      data_dir=''))  # '' = WORKDIR/toy_coco.
  config.dataset = dataset_config.toy_config('', image_size)
  # One padded shape for training and one for evaluation: on a CPU each shape costs a
  # compilation of tens of seconds, more than the padding it would save.
  config.dataset.update(dict(
      train_max_size=image_size, eval_max_size=image_size, max_boxes=20,
      train_bucket_shapes=((image_size, image_size),),
      eval_bucket_shapes=((image_size, image_size),)))
  config.model.update(dict(num_queries=20, hidden_dim=128, num_heads=4, num_encoder_layers=2,
                           num_decoder_layers=2, dim_feedforward=512, dropout=0.0))
  # With 20 queries and at most 20 boxes the on-device solver beats the host round trip.
  config.matcher.solver = 'jax'
  # The nano backbone's masked, shift-equivariant features hold no absolute position.
  config.model.position_at_input = True
  config.backbone_pretraining.steps = 1500
  config.optimizer.update(dict(lr=4e-4, freeze_backbone=True))
  config.train_input = 'cached_features'  # An 8 x 8 x 128 map per image and flip.
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 12  # 6000 steps.
  config.optimizer.decay_fraction = 0.82  # The last 18% of the run at x0.1.
  config.eval_top_k = 20
  config.log_every_steps = 100  # A console line and TensorBoard point every 100 steps.
  config.checkpoint_every_steps = 2000
  config.eval_every_epochs = None  # At the end only.
  return config
