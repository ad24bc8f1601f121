"""Writes dino_tiny.pth and dino_tiny.npz with IDEA-Research/DINO's own model code (needs torch
and a checkout of that repository; run by hand, not by tests):

  python make_dino_fixture.py /path/to/IDEA-Research/DINO

The official DINO (4 levels, two-stage, denoising, look forward twice) at test size: hidden
256 (its query sine code fixes 128 channels per coordinate), 2 + 2 layers, 8 heads, 4 points,
12 queries, 4 classes, dn_number 50, box noise 1.0, label noise 0.5, on given multi-scale
features instead of a backbone. Its multi-scale attention runs through the reference's own
pure-PyTorch `ms_deform_attn_core_pytorch` in place of the CUDA op, `.cuda()` is a no-op, and
the denoising noise (torch.rand_like / randint_like) is recorded so that a test can inject it.
Random weights, rounded to float16 so that the .pth can store them as float16 exactly.

The .pth holds {'model': state_dict} as released checkpoints do. The .npz holds the inputs
(features per level [B, h, w, C], their masks, the image mask, targets, the recorded noise),
and torch's outputs: in inference, every decoder layer's logits and boxes, the encoder's
selected tokens and their logits and boxes; in training, the same for the matching queries,
the denoising part of every layer, the attention mask, the group count and width, and the
criterion's loss terms. Also the parameter counts of the full DINO-4scale ResNet-50 model
(91 classes), as its main.py counts them.
"""
import argparse
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
LEVEL_CHANNELS = (16, 24, 32)  # Strides 8, 16, 32 of a 128 x 192 padded image.
IMAGE = (128, 192)
NUM_CLASSES = 4


def _stand_ins() -> None:
  """What the reference imports but a CPU run does not need: the CUDA op and timm."""
  sys.modules['MultiScaleDeformableAttention'] = types.ModuleType('MultiScaleDeformableAttention')
  timm = types.ModuleType('timm')
  timm.models = types.ModuleType('timm.models')
  timm.models.layers = types.ModuleType('timm.models.layers')
  for name in ('DropPath', 'to_2tuple', 'trunc_normal_'):
    setattr(timm.models.layers, name, None)
  sys.modules.update({'timm': timm, 'timm.models': timm.models,
                      'timm.models.layers': timm.models.layers})
  torch.Tensor.cuda = lambda self, *a, **k: self
  to = torch.Tensor.to
  torch.Tensor.to = lambda self, *a, **k: to(self, *['cpu' if x == 'cuda' else x for x in a],
                                            **k)


def _args(**overrides) -> argparse.Namespace:
  """DINO_4scale.py's settings (the README's training command: box noise 1.0)."""
  args = dict(
      hidden_dim=256, dropout=0.0, nheads=8, num_queries=900, dim_feedforward=2048,
      enc_layers=6, unic_layers=0, dec_layers=6, pre_norm=False, query_dim=4,
      transformer_activation='relu', num_patterns=0, num_feature_levels=4, enc_n_points=4,
      dec_n_points=4, use_deformable_box_attn=False, box_attn_type='roi_align',
      decoder_layer_noise=False, dln_xy_noise=0.2, dln_hw_noise=0.2,
      add_channel_attention=False, add_pos_value=False, random_refpoints_xy=False,
      two_stage_type='standard', two_stage_pat_embed=0, two_stage_add_query_num=0,
      two_stage_learn_wh=False, two_stage_keep_all_tokens=False, dec_layer_number=None,
      decoder_sa_type='sa', decoder_module_seq=['sa', 'ca', 'ffn'], embed_init_tgt=True,
      use_detached_boxes_dec_out=False, fix_refpoints_hw=-1, two_stage_bbox_embed_share=False,
      two_stage_class_embed_share=False, dn_number=100, dn_box_noise_scale=1.0,
      dn_label_noise_ratio=0.5, pe_temperatureH=20, pe_temperatureW=20)
  args.update(overrides)
  return argparse.Namespace(**args)


def _dino(repo: str, backbone, num_channels, num_classes, **overrides):
  from models.dino import deformable_transformer, dino, position_encoding  # noqa
  args = _args(**overrides)
  joiner = torch.nn.Sequential(backbone, position_encoding.PositionEmbeddingSineHW(
      args.hidden_dim // 2, temperatureH=args.pe_temperatureH,
      temperatureW=args.pe_temperatureW, normalize=True))
  joiner.num_channels = list(num_channels)

  def forward(samples):
    features = joiner[0](samples)
    return features, [joiner[1](x).to(x.tensors.dtype) for x in features]
  joiner.forward = forward
  model = dino.DINO(
      joiner, deformable_transformer.build_deformable_transformer(args),
      num_classes=num_classes, num_queries=args.num_queries, aux_loss=True, iter_update=True,
      query_dim=4, random_refpoints_xy=False, fix_refpoints_hw=-1,
      num_feature_levels=args.num_feature_levels, nheads=args.nheads,
      dec_pred_class_embed_share=True, dec_pred_bbox_embed_share=True,
      two_stage_type=args.two_stage_type, two_stage_bbox_embed_share=False,
      two_stage_class_embed_share=False, decoder_sa_type='sa', num_patterns=0,
      dn_number=args.dn_number, dn_box_noise_scale=args.dn_box_noise_scale,
      dn_label_noise_ratio=args.dn_label_noise_ratio, dn_labelbook_size=num_classes)
  return model, args


class _GivenFeatures(torch.nn.Module):
  """The backbone's place: the given levels, each with the image mask resized as DINO's
  ResNet backbone resizes it (nearest)."""

  def __init__(self, features):
    super().__init__()
    self.features = features

  def forward(self, samples):
    from util.misc import NestedTensor  # noqa
    return [NestedTensor(x, F.interpolate(samples.mask[None].float(), size=x.shape[-2:]
                                          ).to(torch.bool)[0]) for x in self.features]


def _core_attention():
  """MSDeformAttn through the reference's pure-PyTorch sampling."""
  from models.dino.ops.functions import ms_deform_attn_func  # noqa
  from models.dino.ops.modules import ms_deform_attn  # noqa

  class Function:
    @staticmethod
    def apply(value, shapes, level_start, locations, weights, im2col_step):
      del level_start, im2col_step
      return ms_deform_attn_func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)
  ms_deform_attn.MSDeformAttnFunction = Function


class _Recorder:
  """Records the outputs of the torch functions DINO draws its noise and its top-K with."""

  def __init__(self):
    self.calls = []
    self._saved = {}

  def __enter__(self):
    for name in ('rand_like', 'randint_like', 'topk'):
      self._saved[name] = original = getattr(torch, name)

      def record(*args, _name=name, _original=original, **kwargs):
        out = _original(*args, **kwargs)
        self.calls.append((_name, (out[1] if _name == 'topk' else out).clone()))
        return out
      setattr(torch, name, record)
    return self

  def __exit__(self, *exc):
    for name, original in self._saved.items():
      setattr(torch, name, original)

  def of(self, name):
    return [out for n, out in self.calls if n == name]


def _randomize(model) -> None:
  """Random values everywhere (the initial zeros would hide layers), rounded to float16."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.02 if 'sampling_offsets' in name else 0.2
      p.copy_((torch.randn(p.shape, generator=generator) * scale).half().float())


def _layers(prefix, layers):
  out = {}
  for i, layer in enumerate(layers):
    out[f'{prefix}/{i}/logits'] = layer['pred_logits'].detach().numpy()
    out[f'{prefix}/{i}/boxes'] = layer['pred_boxes'].detach().numpy()
  return out


def _noise_arrays(recorder, targets, groups, width):
  """The recorded draws laid out per image and denoising slot (slot s = DINO's query s)."""
  counts = [len(t['labels']) for t in targets]
  total, batch = sum(counts), len(targets)
  slots = 2 * groups * (width // 2) if width else 0
  flip_p, amount = recorder.of('rand_like')[:2]
  chosen_labels, sign = recorder.of('randint_like')[:2]
  sign = sign * 2.0 - 1.0
  chosen = torch.nonzero(flip_p < 0.5 * 0.5).view(-1)
  full_new = torch.zeros_like(flip_p, dtype=torch.long)
  full_new[chosen] = chosen_labels.long()
  noise = {k: np.zeros((batch, slots) + s, d) for k, s, d in (
      ('flip', (), np.float32), ('new_label', (), np.int32), ('sign', (4,), np.float32),
      ('amount', (4,), np.float32))}
  starts = np.cumsum([0] + counts)
  for r in range(2 * groups):  # Replica r: group r // 2, negative if odd.
    for b in range(batch):
      for j in range(counts[b]):
        k = r * total + starts[b] + j
        s = r * (width // 2) + j
        noise['flip'][b, s] = flip_p[k]
        noise['new_label'][b, s] = full_new[k]
        noise['sign'][b, s] = sign[k]
        noise['amount'][b, s] = amount[k]
  return noise


def _parameter_counts(repo: str) -> dict:
  """DINO-4scale ResNet-50, 91 classes, 900 queries: all parameters and those that train."""
  import torchvision  # noqa
  from models.dino import backbone as dino_backbone  # noqa
  resnet = torchvision.models.resnet50(weights=None, norm_layer=dino_backbone.FrozenBatchNorm2d)
  body = dino_backbone.BackboneBase(resnet, True, [512, 1024, 2048], [1, 2, 3])
  model, _ = _dino(repo, body, [512, 1024, 2048], 91)
  return {'dino_r50_params': sum(p.numel() for p in model.parameters()),
          'dino_r50_trainable': sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main() -> None:
  repo = sys.argv[1]
  sys.path.insert(0, repo)
  _stand_ins()
  _core_attention()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  batch = 2
  shapes = [(IMAGE[0] // s, IMAGE[1] // s) for s in (8, 16, 32)]
  image_mask = np.zeros((batch, *IMAGE), bool)
  image_mask[1, 96:, :] = image_mask[1, :, 128:] = True  # Image 1: 96 x 128 of 128 x 192.
  features = [torch.tensor(rng.normal(size=(batch, c, h, w)).astype(np.float32))
              for c, (h, w) in zip(LEVEL_CHANNELS, shapes)]
  model, args = _dino(repo, _GivenFeatures(features), LEVEL_CHANNELS, NUM_CLASSES,
                      hidden_dim=256, nheads=8, num_queries=12, dim_feedforward=32,
                      enc_layers=2, dec_layers=2, dn_number=50)
  _randomize(model)
  from models.dino.dino import SetCriterion  # noqa
  from models.dino.matcher import HungarianMatcher  # noqa
  from util.misc import NestedTensor  # noqa
  samples = NestedTensor(torch.zeros(batch, 3, *IMAGE), torch.tensor(image_mask))
  boxes = [np.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.55, 0.3, 0.25], [0.5, 0.5, 0.9, 0.8]]),
           np.array([[0.25, 0.3, 0.3, 0.4], [0.7, 0.7, 0.2, 0.2]])]
  labels = [np.array([1, 3, 0]), np.array([2, 2])]
  targets = [{'boxes': torch.tensor(b, dtype=torch.float32), 'labels': torch.tensor(l)}
             for b, l in zip(boxes, labels)]

  model.eval()
  with torch.no_grad(), _Recorder() as recorder:
    out = model(samples)
  arrays = {**_layers('eval', out['aux_outputs'] + [out]),
            'eval/interm/logits': out['interm_outputs']['pred_logits'].numpy(),
            'eval/interm/boxes': out['interm_outputs']['pred_boxes'].numpy(),
            'eval/selected': recorder.of('topk')[0].numpy()}

  model.train()
  with _Recorder() as recorder:
    out = model(samples, targets)
    weights = {'loss_ce': 1.0, 'loss_bbox': 5.0, 'loss_giou': 2.0}
    weight_dict = dict(weights)
    weight_dict.update({f'{k}_dn': v for k, v in weights.items()})
    for i in range(args.dec_layers - 1):
      weight_dict.update({f'{k}_{i}': v for k, v in weights.items()})
      weight_dict.update({f'{k}_dn_{i}': v for k, v in weights.items()})
    weight_dict.update({f'{k}_interm': v for k, v in weights.items()})
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(cost_class=2.0, cost_bbox=5.0,
                                                           cost_giou=2.0, focal_alpha=0.25),
                             weight_dict, focal_alpha=0.25, losses=['labels', 'boxes'])
    losses = criterion(out, targets)
  meta = out['dn_meta']
  groups, width = meta['num_dn_group'], meta['pad_size'] // meta['num_dn_group']
  known = meta['output_known_lbs_bboxes']
  arrays.update(_layers('train', out['aux_outputs'] + [out]))
  arrays.update(_layers('train/dn', known['aux_outputs'] + [known]))
  arrays.update({
      'train/interm/logits': out['interm_outputs']['pred_logits'].detach().numpy(),
      'train/interm/boxes': out['interm_outputs']['pred_boxes'].detach().numpy(),
      'train/selected': recorder.of('topk')[0].numpy(),
      'train/groups': np.int32(groups), 'train/group_width': np.int32(width),
      'train/loss_total': np.float32(sum(losses[k] * weight_dict[k] for k in weight_dict
                                         if k in losses).detach())})
  arrays.update({f'train/{k}': v.detach().numpy() for k, v in losses.items()
                 if k in weight_dict})
  noise = _noise_arrays(recorder, targets, groups, width)
  arrays.update({f'noise/{k}': v for k, v in noise.items()})
  # The attention mask DINO built, from a second identical call's records.
  from models.dino.dn_components import prepare_for_cdn  # noqa
  torch.manual_seed(0)
  _, _, attn_mask, _ = prepare_for_cdn((targets, 50, 0.5, 1.0), True, 12, NUM_CLASSES, 256,
                                       model.label_enc)
  arrays['train/attn_mask'] = attn_mask.numpy()

  max_boxes = max(len(b) for b in boxes)
  padded = lambda xs, w, dtype: np.stack([np.pad(x, [(0, w - len(x))] + [(0, 0)] *
                                                 (x.ndim - 1)).astype(dtype) for x in xs])
  arrays.update({
      **{f'input/features_{i}': f.permute(0, 2, 3, 1).numpy() for i, f in enumerate(features)},
      **{f'input/mask_{i}': F.interpolate(torch.tensor(image_mask)[None].float(),
                                          size=f.shape[-2:]).to(torch.bool)[0].numpy()
         for i, f in enumerate(features)},
      'input/image_mask': image_mask,
      'input/boxes': padded(boxes, max_boxes, np.float32),
      'input/labels': padded(labels, max_boxes, np.int32),
      'input/box_mask': padded([np.ones(len(b), bool) for b in boxes], max_boxes, bool)})
  arrays.update({k: np.int64(v) for k, v in _parameter_counts(repo).items()})
  halves = {}  # Aliases (the shared box and class heads) keep sharing one storage.
  state = {k: halves.setdefault(v.data_ptr(), v.half()) for k, v in model.state_dict().items()}
  arrays['state_dict_size'] = np.int64(len(state))
  torch.save({'model': state, 'epoch': 0}, os.path.join(HERE, 'dino_tiny.pth'))
  np.savez_compressed(os.path.join(HERE, 'dino_tiny.npz'), **arrays)


if __name__ == '__main__':
  main()
