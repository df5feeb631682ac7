"""The planner's memory model against measurement: one training step's peak on this CPU, per case.

Each case runs in its own process, as a cell trains (retrieval_scaling.train's engine, gradient caching
when the case sets `train.micro_batch`): random weights of the model's architecture, LoRA on every
projection, the paradigm's head, the loss with the FLOPS term, DeepSpeed ZeRO-2 over one gloo rank,
bf16 autocast where this CPU has it natively. Measured: the peak bytes of live tensors from building the
model through two steps (every storage an op creates, until it is freed: what `max_memory_allocated`
counts on a GPU); estimated: `memory.training_peak` for the same config. Also reported: the process's
RSS growth over the same span (glibc returns each allocation of 64 KiB or more on free), which adds the
CPU runtime's own buffers.

    python bench/memory_model.py [--out bench/results/memory_model.json]
    python bench/memory_model.py --fit   # recount memory.SAVED_PER_TOKEN with saved-tensor hooks

Target (issue 31): every estimate within ±25 % of its measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs
from train_step import compose

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA3_VOCAB = ["model=llama3_1b", "model.arch.hidden_size=64", "model.arch.intermediate_size=256",
                "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
                "model.arch.num_key_value_heads=2",
                "model.arch.head_dim=16", "model.arch.tie_word_embeddings=true", "model.dtype=float32",
                "model.recipe.cl.queries=4", "data.query_max_len=64", "data.passage_max_len=128"]
SMOLLM2_SMALL = ["model.recipe.cl.queries=4", "model.recipe.cl.passages_per_query=4"]  # as bench/train_step.py
CASES = {  # name → overrides: each model at its own recipe, sparse and dense
    "tiny_l/sparse/cl": ["model=tiny_l", "paradigm=sparse", "loss=cl"],
    "tiny_l/dense/cl": ["model=tiny_l", "paradigm=dense", "loss=cl"],
    "smollm2_135m/sparse/cl": ["model=smollm2_135m", "paradigm=sparse", "loss=cl", *SMOLLM2_SMALL],
    "smollm2_135m/dense/kd": ["model=smollm2_135m", "paradigm=dense", "loss=kd", "model.recipe.kd.queries=8"],
    "llama3_vocab/sparse/cl/whole": [*LLAMA3_VOCAB, "paradigm=sparse", "loss=cl"],
    "llama3_vocab/sparse/cl/micro4": [*LLAMA3_VOCAB, "paradigm=sparse", "loss=cl", "train.micro_batch=4"],
    "smollm2_135m/sparse/cl/micro8/checkpointing": ["model=smollm2_135m", "paradigm=sparse", "loss=cl",
                                                    "train.micro_batch=8", "train.gradient_checkpointing=true"],
}
TOLERANCE = 0.25
# Every allocation of 64 KiB or more is its own mapping, returned to the OS when freed: RSS then follows
# the live tensors, not glibc's retained free memory.
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def proc_status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def live_tensor_tracker():
    """A dispatch mode counting the bytes of every tensor storage an op creates until it is freed, and
    their peak: a CPU's analogue of `torch.cuda.max_memory_allocated`."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, int] = {}
            self.bytes = self.peak = 0

        def _freed(self, ptr: int) -> None:
            self.bytes -= self.live.pop(ptr, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr and ptr not in self.live:
                        self.live[ptr] = storage.nbytes()
                        self.bytes += storage.nbytes()
                        self.peak = max(self.peak, self.bytes)
                        weakref.finalize(storage, self._freed, ptr)
            return out

    return LiveTensors()


def child(case: str, steps: int) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline)

    from retrieval_scaling.cell_model import deepspeed_config
    from retrieval_scaling.distributed import configure_threads, init_distributed
    from retrieval_scaling.flopcheck import RandomStep
    from retrieval_scaling.gradient_cache import MicroBatches, optimizer_step
    from retrieval_scaling.memory import Precision, training_peak
    from retrieval_scaling.precision import AUTO, use_bf16
    from retrieval_scaling.train import Batch, StepLoss, build_engine

    cfg = compose(CASES[case])
    configure_threads(os.cpu_count() or 1)
    init_distributed()
    bf16 = use_bf16(AUTO, torch.device("cpu"), "train.bf16")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    before = proc_status_gb("VmRSS")
    with live_tensor_tracker() as tracker:
        step = RandomStep(cfg, attn_implementation=cfg["model"].get("attn_implementation") or "sdpa")
        micro = MicroBatches.of(cfg["train"].get("micro_batch"), step.queries, step.queries * step.group)
        engine, _ = build_engine(step.encoder, micro.size, steps + 1, cfg["train"], deepspeed_config(cfg),
                                 micro.backward_passes)
        step_loss = StepLoss(step.step_loss.loss_fn, step.group, step.encoder.paradigm, steps + 1)
        batch = Batch(step.q_ids, torch.ones_like(step.q_ids), step.p_ids, torch.ones_like(step.p_ids), step.teacher)
        for i in range(steps):
            optimizer_step(engine, batch, micro, bf16, lambda q, p: step_loss(q, p, batch.teacher, i))  # noqa: B023
    terms = training_peak(cfg, 1, Precision(autocast=bf16, weight_bytes=4))
    estimate, measured = sum(terms.values()) / 1e9, tracker.peak / 1e9
    return {"case": case, "bf16_autocast": bf16, "micro_batch": cfg["train"].get("micro_batch"),
            "gradient_checkpointing": bool(cfg["train"].get("gradient_checkpointing")),
            "batch": f"{step.queries}x{step.group}", "lengths": f"{step.query_len}/{step.passage_len}",
            "measured_gb": round(measured, 4), "estimated_gb": round(estimate, 4),
            "estimate_over_measured": round(estimate / measured, 3),
            "rss_growth_gb": round(proc_status_gb("VmHWM") - before, 4),
            "terms_gb": {k: round(v / 1e9, 4) for k, v in terms.items()}}


def saved_bytes(arch: dict, layers: int, attention: str, autocast: bool, weights, dropout: float, sequences: int,
                length: int) -> int:
    """Bytes autograd keeps for one forward of a LoRA'd Llama encoder (weights and leaves excluded)."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from retrieval_scaling.backbone import (
        architecture,
        decoder_config,
        lora_config,
        lora_inputs_uncast,
        set_bidirectional,
    )
    from retrieval_scaling.paradigms import paradigm_of

    torch.manual_seed(0)
    model_cfg = {"arch": {**arch, "num_hidden_layers": layers, "vocab_size": 512},
                 "lora": {"r": 16, "alpha": 32, "dropout": dropout, "targets": [
                     "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
    model = LlamaForCausalLM(decoder_config(architecture(model_cfg), attn_implementation=attention))
    set_bidirectional(model, True)
    model = get_peft_model(model, lora_config(model_cfg))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(weights)
    encoder = paradigm_of({"name": "dense"}).encoder(model).train()
    ids = torch.randint(2, 512, (sequences, length))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lora_inputs_uncast(model, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            encoder(ids, torch.ones_like(ids))
    return sum(kept.values())


def per_token_layer(arch: dict, attention: str, autocast: bool, weights, dropout: float, length: int = 64) -> float:
    """Saved bytes per token of one decoder layer: the difference of 2 and 1 layers, at 8 and 4 sequences."""
    counts = {(layers, n): saved_bytes(arch, layers, attention, autocast, weights, dropout, n, length)
              for layers in (1, 2) for n in (4, 8)}
    return ((counts[2, 8] - counts[1, 8]) - (counts[2, 4] - counts[1, 4])) / (4 * length)


FIT_SHAPES = [(256, 704, 4, 2), (256, 1024, 4, 4), (384, 704, 6, 2), (128, 512, 4, 1), (512, 1376, 8, 2)]


def fit(length: int = 64) -> dict:
    """Least-squares coefficients of saved bytes per token and layer on (d, I, kv[, heads × length])."""
    import numpy as np
    import torch

    table = {}
    for attention, autocast in itertools.product(("sdpa", "eager"), (True, False)):
        rows, ys = [], []
        for d, inter, heads, kv_heads in FIT_SHAPES:
            arch = {"hidden_size": d, "intermediate_size": inter, "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "head_dim": d // heads, "tie_word_embeddings": True}
            ys.append(per_token_layer(arch, attention, autocast, torch.float32, 0.0, length))
            rows.append([d, inter, kv_heads * d // heads, heads * length if attention == "eager" else 0])
        x = np.array(rows, float)
        coef = np.linalg.lstsq(x[:, :4 if attention == "eager" else 3], np.array(ys), rcond=None)[0]
        pred = x[:, :len(coef)] @ coef
        table[f"{attention}/{'autocast' if autocast else 'fp32'}"] = {
            "coefficients": [round(float(c), 2) for c in coef],
            "max_relative_error": round(float(np.max(np.abs(pred - ys) / ys)), 4)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_model.json"))
    args = parser.parse_args()
    if args.fit:
        print(json.dumps(fit(), indent=1))
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    results = []
    for case in CASES:
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps)],
                              capture_output=True, text=True, env={**os.environ, **LIVE_RSS})
        if proc.returncode != 0:
            raise SystemExit(f"error: case {case} failed: {proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    worst = max(abs(r["estimate_over_measured"] - 1) for r in results)
    write_result(args.out, {"benchmark": "memory_model", "cases": results, "worst_relative_error": round(worst, 3),
                            "tolerance": TOLERANCE, "within_tolerance": worst <= TOLERANCE})


if __name__ == "__main__":
    main()
