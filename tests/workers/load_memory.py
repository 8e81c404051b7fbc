"""Host memory of streaming a checkpoint in: write a bf16 checkpoint of N layers (width 2048), then in THIS
fresh process build shardtune's 4-bit + LoRA model from it on the CPU and report the transient: peak resident
memory during the build minus resident memory after it (the built model itself lives in host memory on a CPU,
so it is not part of the transient).  usage: python load_memory.py DIR LAYERS
With DIR `random`: random bf16 weights (model.init=random) of one layer of width 2048 and a vocabulary of
LAYERS tokens, drawn where they live, as a GPU run draws them (the embeddings and head dominate)."""

import json
import subprocess
import sys
from pathlib import Path

out, layers = Path(sys.argv[1]), int(sys.argv[2])
random = sys.argv[1] == "random"
if not random and not out.exists():  # write it in a child process, so its memory is not counted here
    code = (
        "import sys, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
        f"c = LlamaConfig(vocab_size=384, hidden_size=2048, intermediate_size=5632, num_hidden_layers={layers}, "
        "num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False); torch.manual_seed(0); "
        f"LlamaForCausalLM(c).to(torch.bfloat16).save_pretrained('{out}', max_shard_size='200MB')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

from shardtune.config import Config, apply_overrides  # noqa: E402
from shardtune.model import loading, modeling  # noqa: E402
from shardtune.observability.memory import host_peak_gib, host_rss_gib  # noqa: E402
from shardtune.parallel.distributed import DistInfo, exit_process, init_distributed, teardown  # noqa: E402
from shardtune.parallel.fsdp import FsdpBackend  # noqa: E402

overrides = {"model.name_or_path": str(out), "model.init": "pretrained"}
if random:
    shape = {"vocab_size": layers, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 1}
    shape |= {"num_attention_heads": 16, "num_key_value_heads": 4, "tie_word_embeddings": False}
    overrides = {"model.init": "random", "parallel.mixed_precision": "bf16"}
    overrides |= {f"model.shape.{k}": v for k, v in shape.items()}
cfg = apply_overrides(Config(), overrides, "test")
info = init_distributed("cpu")
hf_config = modeling.model_config(cfg)
before = host_rss_gib()
model, report = loading.build_model(
    cfg,
    hf_config,
    None if random else str(out),
    "sdpa",
    FsdpBackend(cfg.parallel, cfg.param_dtype, DistInfo.alone(info.device)),
    info.device,
)
after, peak = host_rss_gib(), host_peak_gib()
print(
    json.dumps(
        {
            "layers": layers,
            "checkpoint_gib": report.source_bytes / 2**30,
            "transient_gib": peak - after,
            "model_gib": after - before,
        }
    )
)
teardown()
exit_process(None)  # not through finalization, where gloo's threads can abort a finished run
