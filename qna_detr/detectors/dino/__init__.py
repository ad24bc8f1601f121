"""DINO and its ancestors (Deformable DETR, + box refinement, + two-stage) as one detector."""
