"""A micro experiment (tiny images, tiny DETR) that compiles and trains in seconds on a CPU."""
import ml_collections

from qna_detr import configs


def micro_config(data_dir: str, *, batch_size: int = 4,
                 steps: int = 4) -> ml_collections.ConfigDict:
  config = configs.toy(image_size=64)
  config.dataset.data_dir = data_dir
  config.dataset.toy.update(dict(num_train=16, num_val=8))
  config.dataset.max_boxes = 8
  config.model.update(dict(num_queries=8, hidden_dim=32, num_heads=2, num_encoder_layers=1,
                           num_decoder_layers=2, dim_feedforward=64))
  config.eval_top_k = 8
  config.batch_size = config.eval_batch_size = batch_size
  config.num_train_steps = steps
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_epochs = 1000.0
  return config
