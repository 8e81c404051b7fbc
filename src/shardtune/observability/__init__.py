"""What a run reports about itself: metrics sinks (metrics.py), FLOPs and MFU (flops.py), memory (memory.py)."""
