"""Sharding and processes: the Backend (backend.py) with its FSDP (fsdp.py) and DeepSpeed ZeRO-3 (zero3.py)
implementations, activation checkpointing (checkpointing.py), process groups and collectives (distributed.py)."""
