"""What a run reports about itself: metrics sinks (metrics.py), experiment trackers (trackers.py: TensorBoard,
MLflow, W&B), FLOPs and MFU (flops.py), memory (memory.py)."""
