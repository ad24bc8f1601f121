"""Writes torchvision_tiny.pth and torchvision_tiny.npz (needs torch; run by hand, not by tests).

The .pth is a state dict in torchvision's ResNet naming with tiny shapes, saved by torch.save:
float32 tensors, an int64 batch-norm step counter, a transposed (non-contiguous) conv weight,
tensors at an offset inside a storage they share, and an unknown name. The .npz holds torch's
own values: every tensor, and torch's conv2d, batch_norm (eval) and linear on a random input.
"""
import collections
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
  torch.manual_seed(0)
  shared = torch.randn(40)
  state = collections.OrderedDict({
      'conv1.weight': torch.randn(4, 3, 2, 2),
      'bn1.weight': torch.rand(4) + 0.5,
      'bn1.bias': torch.randn(4),
      'bn1.running_mean': torch.randn(4),
      'bn1.running_var': torch.rand(4) + 0.5,
      'bn1.num_batches_tracked': torch.tensor(7),
      'layer2.0.downsample.0.weight': torch.randn(4, 6, 1, 1).transpose(0, 1),
      'layer2.0.downsample.1.weight': shared[3:9],
      'layer2.0.downsample.1.bias': shared[11:17],
      'layer2.0.downsample.1.running_mean': shared[20:26],
      'layer2.0.downsample.1.running_var': shared[30:36].abs() + 0.5,
      'fc.weight': torch.randn(3, 5),
      'fc.bias': torch.randn(3),
      'layer9.extra': torch.randn(2),
  })
  state._metadata = collections.OrderedDict({'bn1': {'version': 2}})  # As module.state_dict().
  assert not state['layer2.0.downsample.0.weight'].is_contiguous()
  torch.save(state, os.path.join(HERE, 'torchvision_tiny.pth'))

  bn_in, conv_in, fc_in = torch.randn(2, 4, 3, 3), torch.randn(2, 3, 5, 4), torch.randn(2, 5)
  bn = [state[f'bn1.{k}'] for k in ('running_mean', 'running_var', 'weight', 'bias')]
  reference = {name: t.numpy() for name, t in state.items()}
  reference.update({
      'bn1:input': bn_in.permute(0, 2, 3, 1).numpy(),
      'bn1:output': F.batch_norm(bn_in, *bn, training=False, eps=1e-5).permute(0, 2, 3, 1).numpy(),
      'conv1:input': conv_in.permute(0, 2, 3, 1).numpy(),
      'conv1:output': F.conv2d(conv_in, state['conv1.weight']).permute(0, 2, 3, 1).numpy(),
      'fc:input': fc_in.numpy(),
      'fc:output': F.linear(fc_in, state['fc.weight'], state['fc.bias']).numpy(),
  })
  np.savez_compressed(os.path.join(HERE, 'torchvision_tiny.npz'), **reference)


if __name__ == '__main__':
  main()
