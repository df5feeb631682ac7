"""GPU training-step efficiency: model FLOP/s of the paper's 1B cell over the GPU's bf16 matmul peak,
with the cell's bf16 autocast and DeepSpeed ZeRO-2 engine, on random weights of its architecture.

    python bench/gpu_step.py [--case llama3_1b/dense/cl] [--queries 16] [--passages-per-query 17]
                             [--passage-len 128] [--micro-batch 64] [--steps 10] [--checkpointing] [--out ...]

Per step as the cell trains it: frozen weights in bf16 (the model config's `dtype`), LoRA and optimizer
state fp32, autocast bf16, SDPA, the paradigm's head and loss with the FLOPS term, one fixed batch
(`--queries` × `--passages-per-query` passages: one GPU's share of a step), encoded `--micro-batch`
sequences at a time with gradient caching as `train` does (`train.micro_batch`), and its peak memory.
MFU = our FLOP model's FLOPs per step (`plan_cell`, the budget's count: no recomputation) ÷ median
step time ÷ peak, against the bf16 matmul peak measured in the same run and against the datasheet's
dense bf16 peak where the GPU is known.
Also a CUDA profile of one step. Needs a GPU (`--device cpu` runs the same code path, for a check of
the script). Prints one JSON object. Target: MFU ≥ 0.45 on an H100 (issue 8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, by device-name fragment.
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def datasheet_peak(name: str) -> float | None:
    return next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(cfg: dict, device, attn: str):
    """`RandomStep` at the cell's dtypes on `device`: frozen weights in the model config's dtype
    (LoRA and any trained embeddings stay fp32, as peft and the cell keep them)."""
    import torch

    from retrieval_scaling.flopcheck import RandomStep

    step = RandomStep(cfg, attn_implementation=attn)
    frozen = getattr(torch, str(cfg["model"].get("dtype") or "float32"))
    for p in step.encoder.parameters():
        if not p.requires_grad:
            p.data = p.data.to(frozen)
    step.encoder.to(device)
    step.q_ids, step.p_ids, step.teacher = (t.to(device) for t in (step.q_ids, step.p_ids, step.teacher))
    return step


def profile_ops(step_fn, device, top: int = 12) -> list[dict]:
    """The ops with the most self device time (self CPU time on a CPU) in one step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_fn()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1
    return [{"op": e.key, "self_ms": round(getattr(e, attr) / 1e3, 2), "share": round(getattr(e, attr) / total, 4),
             "calls": e.count} for e in events[:top]]


def main() -> None:
    import deepspeed
    import torch
    from train_step import compose, peak_matmul_flops, timed_steps

    from retrieval_scaling.backbone import lora_inputs_uncast
    from retrieval_scaling.cell_model import deepspeed_config
    from retrieval_scaling.distributed import init_distributed
    from retrieval_scaling.gradient_cache import MicroBatches, optimizer_step
    from retrieval_scaling.memory import Precision, training_peak
    from retrieval_scaling.plan import plan_cell
    from retrieval_scaling.train import Batch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="llama3_1b/dense/cl", help="<model>/<paradigm>/<loss>")
    parser.add_argument("--queries", type=int, default=16, help="queries in a GPU's share of the step")
    parser.add_argument("--passages-per-query", type=int, default=17, help="positive + hard negatives (the paper: 17)")
    parser.add_argument("--query-len", type=int, default=64)  # the paper's lengths (docs/recipe.md)
    parser.add_argument("--passage-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per forward (train.micro_batch; 0: "
                        "the whole share at once)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the paper's setting)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_step.json"))
    args = parser.parse_args()

    model, paradigm, loss = args.case.split("/")
    cfg = compose([f"model={model}", f"paradigm={paradigm}", f"loss={loss}",
                   f"model.recipe.{loss}.queries={args.queries}",
                   f"model.recipe.{loss}.passages_per_query={args.passages_per_query}",
                   f"data.query_max_len={args.query_len}", f"data.passage_max_len={args.passage_len}",
                   f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
                   f"train.micro_batch={args.micro_batch or 'null'}"])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this benchmark needs a GPU (or --device cpu to check the script).")
    init_distributed()
    plan = plan_cell(cfg)
    peak = peak_matmul_flops(torch.bfloat16, n=8192, repeats=20, device=device)
    step = build_step(cfg, device, attn=cfg["model"].get("attn_implementation") or "sdpa")
    params = [p for p in step.encoder.parameters() if p.requires_grad]
    micro = MicroBatches.of(args.micro_batch or None, step.queries, step.queries * step.group)
    ds_cfg = {**deepspeed_config(cfg), "train_micro_batch_size_per_gpu": micro.size,
              "gradient_accumulation_steps": micro.backward_passes,
              "gradient_clipping": float(cfg["train"]["grad_clip"]), "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=step.encoder, optimizer=torch.optim.AdamW(params, lr=1e-5),
                                           config=ds_cfg)
    batch = Batch(step.q_ids, torch.ones_like(step.q_ids), step.p_ids, torch.ones_like(step.p_ids), step.teacher)
    step_loss = step.step_loss  # its last step: the FLOPS term at full weight

    def engine_step():  # as `train` steps: whole, or gradient-cached micro-batches
        optimizer_step(engine, batch, micro, True, lambda q, p: step_loss(q, p, batch.teacher, 1))
        sync(device)

    with lora_inputs_uncast(step.encoder, True):
        times = timed_steps(engine_step, args.steps)
        top_ops = profile_ops(engine_step, device)
    step_s = statistics.median(times)
    frozen_bytes = 2 if str(cfg["model"].get("dtype")) in ("bfloat16", "float16") else 4
    estimate = sum(training_peak(cfg, 1, Precision(autocast=True, weight_bytes=frozen_bytes)).values()) / 1e9
    measured = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sheet = datasheet_peak(name) if device.type == "cuda" else None
    achieved = plan["flops_per_step"] / step_s
    result = {"benchmark": "gpu_step", "device": name, "case": args.case,
              "batch": f"{step.queries}x{step.group}", "lengths": f"{step.query_len}/{step.passage_len}",
              "gradient_checkpointing": args.checkpointing, "zero_stage": ds_cfg["zero_optimization"]["stage"],
              "micro_batch": args.micro_batch or None, "backward_passes": micro.backward_passes,
              "flops_per_step": plan["flops_per_step"], "step_s": step_s, "model_flops_per_s": achieved,
              "peak_bf16_matmul_flops_measured": peak, "peak_bf16_datasheet": sheet,
              "mfu_vs_measured_peak": achieved / peak, "mfu_vs_datasheet": achieved / sheet if sheet else None,
              # with checkpointing the GPU also recomputes each layer's forward: hardware FLOPs utilisation
              "hardware_flops_per_step": plan["hardware_flops_per_step"],
              "hfu_vs_measured_peak": plan["hardware_flops_per_step"] / step_s / peak,
              "max_memory_gib": measured and measured * 1e9 / 2**30,
              # the planner's memory model (retrieval_scaling/memory.py) against torch's peak of allocated bytes
              "memory_estimate_gb": estimate, "memory_measured_gb": measured,
              "memory_estimate_over_measured": measured and estimate / measured,
              "profile_top_ops": top_ops}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
