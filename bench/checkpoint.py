"""A cell's checkpoint on disk: the whole engine state against the trainable state alone.

A SmolLM2-135M cell (random weights of its shapes, its LoRA, head and loss, `make smoke-real`'s dense
CL+KD cell) in its DeepSpeed ZeRO-2 engine takes one optimizer step, then is checkpointed twice: with
every parameter (DeepSpeed's default, what cells wrote before) and as `train.save_checkpoint` writes it
(the frozen base left out). A third engine built the same way loads the second checkpoint and must
hold the same trainable weights. Then a cell killed after its checkpoint: 4 steps straight through
against 2 steps, a checkpoint, a new engine resumed from it and 2 more steps, with the model's LoRA
dropout on: the same final trainable weights (atol 1e-6). Prints one JSON object.

    python bench/checkpoint.py [--case smollm2_135m/dense/cl_kd] [--out bench/results/checkpoint.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs
from train_step import case_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def engine_of(cfg: dict):
    import deepspeed
    import torch

    from retrieval_scaling.cell_model import deepspeed_config
    from retrieval_scaling.distributed import init_distributed
    from retrieval_scaling.flopcheck import RandomStep

    init_distributed()
    torch.manual_seed(0)
    step = RandomStep(cfg, attn_implementation="sdpa")
    params = [p for p in step.encoder.parameters() if p.requires_grad]
    ds_cfg = {**deepspeed_config(cfg), "train_micro_batch_size_per_gpu": step.queries,
              "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=step.encoder, optimizer=torch.optim.AdamW(params, lr=1e-3),
                                           config=ds_cfg)
    return engine, step


def projected(bytes_per_trainable: float) -> dict[str, float]:
    """Checkpoint share of the trainable state for the Llama-3 cells, from their planned parameter counts."""
    from train_step import compose

    from retrieval_scaling.plan import plan_cell

    out = {}
    for model in ("llama3_1b", "llama3_3b", "llama3_8b"):
        plan = plan_cell(compose([f"model={model}", "+grid=full", "hydra.mode=RUN", "loss=cl", "budget.flops=1e20"]))
        trainable = plan["params_trainable"] * bytes_per_trainable
        out[model] = trainable / ((plan["params_total"] - plan["params_trainable"]) * 2 + trainable)
    return out


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def train_steps(engine, step, steps: range) -> None:
    from retrieval_scaling.train import seed_step

    for number in steps:
        seed_step(0, number)  # as `train` seeds each step: the same dropout masks after a resume
        engine.backward(step.loss(engine))
        engine.step()


def trainable(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def killed_and_resumed(cfg: dict, tmp: Path, steps: int, kill_after: int) -> float:
    """Max |difference| of the trainable weights after `steps` steps, run straight through against run
    to a checkpoint at `kill_after`, dropped, rebuilt and resumed from it."""
    from retrieval_scaling.train import resume, save_checkpoint

    straight, step = engine_of(cfg)
    train_steps(straight, step, range(steps))
    want = trainable(straight)
    first, step = engine_of(cfg)
    train_steps(first, step, range(kill_after))
    save_checkpoint(first, tmp / "killed", {"step": kill_after})
    del first  # the job dies here; a new one builds the cell again and resumes
    second, step = engine_of(cfg)
    start = int(resume(second, tmp / "killed", "the cell")["step"])
    train_steps(second, step, range(start, steps))
    got = trainable(second)
    return max(float((got[n] - want[n]).abs().max()) for n in want)


def main() -> None:
    import torch

    from retrieval_scaling.train import resume, save_checkpoint, trainable_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="smollm2_135m/dense/cl_kd")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "checkpoint.json"))
    args = parser.parse_args()
    cfg = case_config(args.case)
    engine, step = engine_of(cfg)
    train_steps(engine, step, range(1))
    with tempfile.TemporaryDirectory(prefix="rs-ckpt-") as tmp:
        whole, trainable = Path(tmp) / "whole", Path(tmp) / "trainable"
        engine.save_checkpoint(str(whole), tag="step1", client_state={"step": 1})
        save_checkpoint(engine, trainable, {"step": 1})
        again, _ = engine_of(cfg)
        client = resume(again, trainable, "the cell")
        before = dict(engine.module.named_parameters())
        same = all(torch.equal(before[n], p) for n, p in again.module.named_parameters() if p.requires_grad)
        result = {
            "benchmark": "checkpoint", "case": args.case,
            "params_total": sum(p.numel() for p in engine.module.parameters()),
            "params_trainable": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
            "whole_bytes": size_of(whole), "trainable_bytes": size_of(trainable),
            "trainable_over_whole": size_of(trainable) / size_of(whole),
            "resumed_step": client["step"], "resumed_trainable_weights_equal": bool(same),
            "trainable_tensors": len(trainable_names(engine)),
            # measured bytes per trainable parameter (module weights, fp32 master, Adam's two moments), and
            # what that makes of the paper's backbones, whose frozen weights are bf16 (2 bytes each)
            "bytes_per_trainable_param": size_of(trainable) / sum(p.numel() for p in engine.module.parameters()
                                                                  if p.requires_grad),
        }
        result["projected_trainable_over_whole"] = projected(result["bytes_per_trainable_param"])
        result["lora_dropout"] = float(cfg["model"]["lora"]["dropout"])
        result["killed_at_step_2_of_4_max_abs_diff"] = killed_and_resumed(cfg, Path(tmp), steps=4, kill_after=2)
        result["killed_and_resumed_equal_atol_1e-6"] = result["killed_at_step_2_of_4_max_abs_diff"] <= 1e-6
    write_result(args.out, result)


if __name__ == "__main__":
    main()
