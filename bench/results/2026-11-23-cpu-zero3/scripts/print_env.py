import os, sys
keys = sorted(k for k in os.environ if k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD", "MASTER_", "GROUP_", "ROLE_", "TORCHELASTIC", "OMP_NUM", "NCCL_", "PYTHONPATH")))
if os.environ.get("RANK", "0") == "0":
    for k in keys: print(f"  {k}={os.environ[k]}")
    print("  argv:", sys.argv)
    try:
        from accelerate import Accelerator
        acc = Accelerator()
        print("  Accelerator():", acc.distributed_type, "device", acc.device, "| ds plugin:",
              acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") if acc.state.deepspeed_plugin else None,
              "| gas", acc.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps"),
              "| clip", acc.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping"),
              "| bf16", acc.state.deepspeed_plugin.deepspeed_config.get("bf16"))
        from transformers.integrations import is_deepspeed_zero3_enabled
        print("  transformers is_deepspeed_zero3_enabled():", is_deepspeed_zero3_enabled())
    except Exception as e:
        print("  Accelerator() failed:", type(e).__name__, str(e)[:400])
else:
    try:
        from accelerate import Accelerator; Accelerator()
    except Exception:
        pass
