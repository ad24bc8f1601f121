"""Pictures of a detector: its detections, QnA attention maps and QnA window kernels."""
