"""DETR (Carion et al. 2020): position encoding, transformer, model, Hungarian matcher, set
losses and post-processing; `builder` registers it as the detector 'detr'."""
