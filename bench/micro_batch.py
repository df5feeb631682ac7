"""One sparse CL step's memory, whole batch against micro-batches: gradient caching plus chunked pooling.

A Llama-3-shaped backbone with Llama-3's vocabulary (128,256 terms, tied head) and a small hidden size
(random weights, bidirectional, the paper's LoRA on every projection), the Lion-SP head, CL with
in-batch negatives and the FLOPS term, through a DeepSpeed ZeRO-2 engine as a cell builds it: 4
queries of 64 tokens and 4 × 17 passages of 128 tokens, in fp32 (bf16 autocast where native). Each
variant runs in its own process: the peak RSS of its steps over what the process held before the first
(VmHWM reset through /proc/self/clear_refs), and the median time of `--steps` steps after the first.
Variants: the whole batch with the pooling's (N, L, V) logits built whole (as before micro-batches),
the whole batch with chunked pooling, and `--micro-batch` sequences per forward with chunked pooling.

    python bench/micro_batch.py [--micro-batch 4] [--steps 2] [--out bench/results/micro_batch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES, GROUP, QUERY_LEN, PASSAGE_LEN = 4, 17, 64, 128
ARCH = {"vocab_size": 128_256, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
FLOPS = {"lambda_q": 5e-4, "lambda_d": 5e-4, "warmup_fraction": 0.0}  # the regulariser at full weight
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(micro_batch: int | None, steps: int, chunked: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrieval_scaling import encoders
    from retrieval_scaling.backbone import set_bidirectional
    from retrieval_scaling.distributed import configure_threads, init_distributed
    from retrieval_scaling.gradient_cache import MicroBatches, optimizer_step
    from retrieval_scaling.losses import ContrastiveLoss
    from retrieval_scaling.paradigms import paradigm_of
    from retrieval_scaling.precision import AUTO, use_bf16
    from retrieval_scaling.train import Batch, StepLoss, build_engine

    if not chunked:  # the pooling as it was: the (N, L, V) logits of the whole forward at once
        encoders.POOL_CHUNK_ELEMENTS = 2**62
    configure_threads(os.cpu_count() or 1)
    init_distributed()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**ARCH, attn_implementation="sdpa"))
    set_bidirectional(model, True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS)
    encoder = paradigm_of({"name": "sparse", "flops": FLOPS}).encoder(get_peft_model(model, lora)).train()
    gen = torch.Generator().manual_seed(1)
    batch = Batch(torch.randint(3, ARCH["vocab_size"], (QUERIES, QUERY_LEN), generator=gen),
                  torch.ones(QUERIES, QUERY_LEN, dtype=torch.long),
                  torch.randint(3, ARCH["vocab_size"], (QUERIES * GROUP, PASSAGE_LEN), generator=gen),
                  torch.ones(QUERIES * GROUP, PASSAGE_LEN, dtype=torch.long), torch.zeros(QUERIES, GROUP))
    micro = MicroBatches.of(micro_batch, QUERIES, QUERIES * GROUP)
    train_cfg = {"lr": 1e-4, "weight_decay": 0.0, "warmup_fraction": 0.04, "grad_clip": 1.0}
    ds_cfg = {"zero_optimization": {"stage": 2, "contiguous_gradients": True}, "steps_per_print": 10**9}
    engine, _ = build_engine(encoder, micro.size, steps + 1, train_cfg, ds_cfg, micro.backward_passes)
    step_loss = StepLoss(ContrastiveLoss(), GROUP, encoder.paradigm, steps + 1)
    bf16 = use_bf16(AUTO, torch.device("cpu"), "train.bf16")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    before, times = rss_gb("VmRSS"), []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer_step(engine, batch, micro, bf16, lambda q, p: step_loss(q, p, batch.teacher, step))  # noqa: B023
        times.append(time.perf_counter() - start)
    return {"micro_batch": micro_batch, "chunked_pooling": chunked, "backward_passes": micro.backward_passes,
            "bf16": bf16, "rss_before_gb": before, "peak_rss_gb": rss_gb("VmHWM"),
            "step_peak_gb": rss_gb("VmHWM") - before, "step_s": statistics.median(times[1:])}


def run_child(micro_batch: int | None, steps: int, chunked: bool) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", "--micro-batch", str(micro_batch or 0),
                           "--steps", str(steps), *([] if chunked else ["--whole-pooling"])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the benchmark's child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)  # sequences per forward pass
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--whole-pooling", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "micro_batch.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.micro_batch or None, args.steps, not args.whole_pooling)))
        return
    whole = run_child(None, args.steps, chunked=False)
    whole_chunked = run_child(None, args.steps, chunked=True)
    micro = run_child(args.micro_batch, args.steps, chunked=True)
    write_result(args.out, {
        "benchmark": "micro_batch", "arch": ARCH, "queries": QUERIES, "passages_per_query": GROUP,
        "query_len": QUERY_LEN, "passage_len": PASSAGE_LEN, "whole": whole, "whole_chunked_pooling": whole_chunked,
        "micro": micro,
        "step_peak_whole_over_micro": whole["step_peak_gb"] / micro["step_peak_gb"],
        "step_time_micro_over_whole": micro["step_s"] / whole["step_s"],
    })


if __name__ == "__main__":
    main()
