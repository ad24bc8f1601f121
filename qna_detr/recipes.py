"""The experiment configs that the files in configs/ return (each a Scenic-style get_config()).

Every key of a run is here, with a line on what it is; `--config.KEY=VALUE` overrides any.
"""
import ml_collections
from ml_collections import config_dict

from qna_detr.data import dataset_config
from qna_detr.data import toy as toy_set


def _common(backbone: str) -> ml_collections.ConfigDict:
  """The keys every detector's recipe has: data, optimizer, weights, phases, the run."""
  config = ml_collections.ConfigDict()
  # Modules to import first: they register detectors or backbones of one's own.
  config.imports = ()
  config.rng_seed = 0
  config.dataset = dataset_config.default_config()
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
      format='auto',  # backbones.weights.FORMATS.
      # True: load what fits (another variant's checkpoint), the rest stays random.
      allow_partial=False))
  # Dense pretraining of the backbone on class maps and box edges before the detector, for
  # data without an ImageNet checkpoint (train/dense_pretraining.py); 0 steps = off.
  config.backbone_pretraining = ml_collections.ConfigDict(dict(
      steps=0, lr=1e-3, warmup_steps=50, weight_decay=1e-4,
      level=-1,  # The backbone level whose sub-cells learn the targets (-1: the last).
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
  config.model = ml_collections.ConfigDict(dict(
      backbone=backbone,  # The backbone (qna_detr.backbones registry).
      backbone_drop_path=config_dict.placeholder(float),  # QnA-ViT: None = the variant's rate.
      qna_implementation='auto',  # QnA-ViT: qna_detr.layers.qna.IMPLEMENTATIONS.
      dtype='float32'))  # Compute dtype ('float32' or 'bfloat16'); parameters stay float32.
  return config


def detr_coco(backbone: str) -> ml_collections.ConfigDict:
  """The paper's DETR recipe (supplement 2.2) on TFDS coco/2017 over a registered backbone."""
  config = _common(backbone)
  config.experiment_name = f'detr_{backbone}_coco'
  config.model.update(dict(
      name='detr',  # The detector (qna_detr.detectors registry).
      num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
      num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, aux_loss=True,
      # Position codes at queries and keys only, as DETR; True also adds them to the input
      # features once (see detectors/detr/model.py).
      position_at_input=False,
      feature_level=-1))  # The backbone level the transformer reads (-1: the last).
  config.matcher = ml_collections.ConfigDict(dict(
      cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
      solver='scipy'))  # 'scipy' (host) or 'jax' (on device).
  config.loss = ml_collections.ConfigDict(dict(ce=1.0, bbox=5.0, giou=2.0, no_object=0.1))
  return config


def dino_coco(backbone: str) -> ml_collections.ConfigDict:
  """DINO-4scale's 12-epoch recipe (IDEA-Research/DINO) on TFDS coco/2017: global batch 16,
  AdamW lr 1e-4, backbone lr 1e-5, x0.1 after epoch 11 (11/12 of the run: 24 epochs decay
  after 22, 36 after 33), DETR's multi-scale augmentation."""
  config = _common(backbone)
  config.experiment_name = f'dino_{backbone}_coco'
  config.model.update(dict(
      name='dino',
      # Backbone levels read (strides 8, 16, 32 of a four-stage backbone), plus extra
      # stride-2 levels up to num_feature_levels (stride 64).
      feature_levels=(1, 2, 3), num_feature_levels=4,
      hidden_dim=256, num_heads=8, num_encoder_layers=6, num_decoder_layers=6,
      dim_feedforward=2048, dropout=0.0, enc_points=4, dec_points=4, num_queries=900,
      two_stage=True,  # Queries from the encoder's best proposals (False: learned anchors).
      box_refinement=True,  # Each decoder layer refines the anchors.
      look_forward_twice=True,  # A layer's boxes train the previous layer's refinement.
      # Contrastive denoising queries (0: none); DINO's README trains with box noise 1.0.
      dn_number=100, dn_label_noise=0.5, dn_box_noise=1.0,
      pe_temperature=20.0,  # Of the levels' sine position codes.
      deformable_attention='auto'))  # qna_detr.layers.deformable_attention.IMPLEMENTATIONS.
  config.matcher = ml_collections.ConfigDict(dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                                  solver='scipy'))
  config.loss = ml_collections.ConfigDict(dict(
      ce=1.0, bbox=5.0, giou=2.0, focal_alpha=0.25,
      interm=1.0))  # Weight of the encoder selection's terms.
  config.optimizer.decay_fraction = 11 / 12
  config.batch_size = config.eval_batch_size = 16
  config.num_epochs = 12
  config.eval_every_epochs = 1.0
  config.eval_top_k = 300  # DINO's num_select (top scores over queries x classes).
  return config


def detr_resnet50_coco() -> ml_collections.ConfigDict:
  """DETR-R50, DETR's own baseline (Carion et al. 2020): the same recipe over ResNet-50."""
  config = detr_coco('resnet50')
  config.experiment_name = 'detr_resnet50_coco'
  return config


def _toy_data(config: ml_collections.ConfigDict, image_size: int) -> None:
  """The synthetic shapes set in WORKDIR/toy_coco, one padded shape per split, and the nano
  backbone's dense pretraining on it (there is no ImageNet checkpoint for it), then frozen."""
  config.toy_data = ml_collections.ConfigDict(dict(
      num_train=8000,  # Enough that the detector does not overfit its training images.
      num_val=1000,  # Enough that the AP of one run is not the luck of a few images.
      image_size=image_size, seed=0,
      data_dir=''))  # '' = WORKDIR/toy_coco.
  # DETR's sizes scaled to the toy images, one padded shape per split (on a CPU each shape
  # costs a compilation of tens of seconds, more than the padding it would save); they
  # follow --config.toy_data.image_size (data/toy.py: dataset_sizes).
  config.dataset = dataset_config.toy_config('', image_size)
  config.dataset.update(toy_set.dataset_sizes(image_size))
  config.dataset.max_boxes = 20
  config.backbone_pretraining.steps = 1500
  config.optimizer.update(dict(lr=4e-4, freeze_backbone=True))
  config.train_input = 'cached_features'  # The levels read, per image and flip, in memory.
  config.batch_size = 16
  config.eval_batch_size = 16
  config.log_every_steps = 100  # A console line and TensorBoard point every 100 steps.
  config.checkpoint_every_steps = 2000
  config.eval_every_epochs = None  # At the end only.
  config.eval_top_k = 20


def toy(image_size: int = 128) -> ml_collections.ConfigDict:
  """The synthetic shapes set, made into WORKDIR/toy_coco, sized for a 2-core CPU.

  A nano QnA-ViT pretrains densely on the set, then stays frozen while DETR trains on its
  cached features.
  """
  config = detr_coco('qna_vit_nano')
  config.experiment_name = 'detr_qna_vit_nano_toy'
  _toy_data(config, image_size)
  config.model.update(dict(num_queries=20, hidden_dim=128, num_heads=4, num_encoder_layers=2,
                           num_decoder_layers=2, dim_feedforward=512, dropout=0.0))
  # With 20 queries and at most 20 boxes the on-device solver beats the host round trip.
  config.matcher.solver = 'jax'
  # The nano backbone's masked, shift-equivariant features hold no absolute position.
  config.model.position_at_input = True
  config.num_epochs = 12  # 6000 steps.
  config.optimizer.decay_fraction = 0.82  # The last 18% of the run at x0.1.
  return config


def dino_toy(image_size: int = 128) -> ml_collections.ConfigDict:
  """DINO on the synthetic shapes set, beside `toy`: the same set, nano backbone and dense
  pretraining, then DINO on the cached stride-8 and stride-16 maps plus one extra level, for
  as many steps as fit the toy DETR's time on a 2-core CPU."""
  config = dino_coco('qna_vit_nano')
  config.experiment_name = 'dino_qna_vit_nano_toy'
  _toy_data(config, image_size)
  # No denoising queries: they cost a quarter of the step and did not pay off in this
  # budget (docs/2026-12-04-dino-and-the-house.md).
  config.model.update(dict(feature_levels=(1, 2), num_feature_levels=3, hidden_dim=64,
                           num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=256, num_queries=100, dn_number=0))
  config.num_train_steps = 1600  # 3.2 epochs: the toy DETR's 6000 steps' time on a CPU.
  config.optimizer.decay_fraction = 0.82  # As the toy DETR's: the last 18% at x0.1.
  config.eval_top_k = 100
  return config


def cpu_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` shrunk to what tools/accelerator_benchmarks.sh --cpu-smoke runs on a CPU (the
  configs in configs/cpu_smoke/): one encoder and decoder layer, a narrow head, few queries
  and boxes, and QnA-ViT configs on the nano backbone (the same code, three stages)."""
  config.model.update(dict(num_encoder_layers=1, num_decoder_layers=1, hidden_dim=32,
                           dim_feedforward=64, num_queries=8))
  config.dataset.max_boxes = 4
  if config.model.backbone.startswith('qna_vit'):
    config.model.backbone = 'qna_vit_nano'
    if config.model.name == 'dino':  # The nano backbone's strides 8 and 16, one extra level.
      config.model.update(dict(feature_levels=(1, 2), num_feature_levels=3, dn_number=50))
  return config
