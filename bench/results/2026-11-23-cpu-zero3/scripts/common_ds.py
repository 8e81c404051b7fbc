"""DeepSpeed helpers shared by the z3_*.py experiments."""
import torch, torch.distributed as dist


def ds_config(bf16=False, gas=1, clip=0.0, persist=0, micro=1):
    return {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": 3,
                              # default 1e5 elements: smaller params are NOT partitioned (kept whole on every rank)
                              "stage3_param_persistence_threshold": persist,
                              "stage3_model_persistence_threshold": 0 if persist == 0 else 10**12},
        "bf16": {"enabled": bf16}, "gradient_clipping": clip,
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }


def make_engine(model, cfg, lr):
    import deepspeed
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def mean_all(x):
    t = torch.tensor([float(x)], dtype=torch.float64); dist.all_reduce(t); return t.item() / dist.get_world_size()
