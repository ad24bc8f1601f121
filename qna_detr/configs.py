"""Experiment configs shared by the files in configs/ (each a Scenic-style get_config())."""
import ml_collections
from ml_collections import config_dict

from qna_detr.data import pipeline


def detr_coco(backbone: str) -> ml_collections.ConfigDict:
  """The paper's DETR recipe (supplement 2.2) on TFDS coco/2017 with a QnA-ViT backbone."""
  config = ml_collections.ConfigDict()
  config.experiment_name = f'detr_{backbone}_coco'
  config.rng_seed = 0
  config.dataset = pipeline.default_config()
  config.model = ml_collections.ConfigDict(dict(
      backbone=backbone,
      backbone_drop_path=config_dict.placeholder(float),  # None: the variant's own rate.
      num_queries=100, hidden_dim=256, num_heads=8, num_encoder_layers=6,
      num_decoder_layers=6, dim_feedforward=2048, dropout=0.1, aux_loss=True,
      position_at_input=True,  # See detr.model.DETR: QnA-ViT's features hold no position.
      feature_level=-1,  # The backbone level the transformer reads (-1: the last).
      dtype='float32'))
  config.matcher = ml_collections.ConfigDict(dict(
      cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, solver='scipy'))
  config.loss = ml_collections.ConfigDict(dict(ce=1.0, bbox=5.0, giou=2.0, no_object=0.1))
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4, grad_clip_norm=0.1, schedule='step',
      decay_epochs=(50,), decay_factor=0.1, warmup_steps=0, freeze_backbone=False))
  config.pretrained = ml_collections.ConfigDict(dict(
      path='',  # ImageNet QnA-ViT checkpoint for the backbone ('' = train from scratch).
      format='auto'))  # 'auto', 'qna_detr' or 'authors' (the released QnA-ViT checkpoints).
  # Dense pretraining of the backbone on class maps and box edges before DETR, for data
  # without an ImageNet checkpoint (see train/dense_pretraining.py); 0 steps = off.
  config.backbone_pretraining = ml_collections.ConfigDict(dict(
      steps=0, lr=1e-3, warmup_steps=50, weight_decay=1e-4, upsample=4,
      edge_weight=3.0))  # Of the box edges' L1 loss against the class maps' cross-entropy.
  # > 0: evaluation reads a moving average of the parameters with this decay per step.
  config.ema_decay = 0.0
  # With a frozen backbone: compute its features of every training image (and its flip) once
  # and train DETR on them, without the multi-scale resize and crop (train/feature_cache.py).
  config.cache_backbone_features = False
  config.batch_size = 32  # Global, over all devices and processes.
  config.eval_batch_size = 32
  config.num_epochs = 75
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.eval_every_epochs = 5.0
  config.eval_top_k = 100
  return config


def toy(image_size: int = 128) -> ml_collections.ConfigDict:
  """The synthetic shapes set, generated into WORKDIR/toy_coco, sized for a 2-core CPU."""
  config = detr_coco('qna_vit_nano')
  config.experiment_name = 'detr_qna_vit_nano_toy'
  config.dataset = pipeline.toy_config('', image_size)  # '' = WORKDIR/toy_coco.
  # 8000 training images (about 12 s to make): with 1000 the detector overfits them (train AP
  # 0.24 against validation 0.14), with 8000 it does not.
  config.dataset.toy.num_train = 8000
  # 1000 validation images (about 10 s an evaluation): on the first 100 alone, the AP of one
  # model came out 0.02-0.035 higher than on all 1000, enough to hide what a change does.
  config.dataset.toy.num_val = 1000
  # One padded shape for training and one for evaluation: on a CPU each shape costs a
  # compilation of tens of seconds, more than the padding it would save.
  config.dataset.update(dict(
      train_max_size=image_size, eval_max_size=image_size, max_boxes=20,
      train_bucket_shapes=((image_size, image_size),),
      eval_bucket_shapes=((image_size, image_size),)))
  config.model.update(dict(num_queries=20, hidden_dim=128, num_heads=4, num_encoder_layers=2,
                           num_decoder_layers=2, dim_feedforward=512, dropout=0.0))
  # The backbone pretrains for 1500 steps (there is no ImageNet checkpoint for the toy set),
  # then stays frozen: DETR's gradient barely changes it (AP 0.040 frozen against 0.042
  # trained, after 1500 steps), and without its backward pass a step is 3.8x faster. The
  # frozen features bound the detector: within the README's 15 minutes on a 2-core CPU,
  # 1500 pretraining steps and 7000 DETR steps gave AP 0.249 where 1000 and 8000 gave 0.194
  # (and 2000 and 4500, 0.173): single runs on the first 100 validation images, where seeds
  # alone move AP by up to 0.07 (0.215 on all 1000; README, Status). With the box edges too
  # (weight 1), 1000 and 8000 steps gave 0.247 against 0.260 for 1500 and 6000.
  config.backbone_pretraining.steps = 1500
  # The pretraining's box edges (weight 3) made the frozen features worth more than any change
  # of the head: 6000 DETR steps (x0.1 after 82%) gave AP 0.322 with lr 4e-4, against 0.279
  # with lr 2e-4, 0.260 with edge weight 1 (0.281 with lr 4e-4, 0.269 with 8e-4) and 0.109
  # without the edges at 5000 steps (0.239 with edge weight 1); before the edges, 15000 steps
  # were needed for 0.271 (seed 0; 1000 validation images; README, Status).
  config.optimizer.update(dict(lr=4e-4, freeze_backbone=True))
  # DETR reads the frozen features from memory (an 8 x 8 x 128 map per image and flip).
  config.cache_backbone_features = True
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 12  # 6000 steps.
  config.optimizer.decay_epochs = (9.84,)
  config.eval_top_k = 20
  config.log_every_steps = 20
  config.checkpoint_every_steps = 1000  # About 30-45 s of training.
  config.eval_every_epochs = 12.0  # At the end only: a halfway evaluation costs 12 s.
  return config
