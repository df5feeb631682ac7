"""Training-step efficiency: achieved model FLOP/s (our FLOP model ÷ step time) over this machine's
measured peak matmul FLOP/s, and DeepSpeed's overhead over a bare torch + peft loop, side by side.

    python bench/train_step.py [--cases tiny_l/dense/cl,tiny_s/sparse/cl,smollm2_135m/dense/cl]
                               [--steps 6] [--out bench/results/train_step.json]

Per case, at the cell's shapes (the SmolLM2 cell at the `make smoke-real` shapes): random weights of
the cell's architecture with its LoRA, trainable embeddings, head, loss and FLOPS term; one fixed
batch; autocast (bf16 where this CPU has it natively, `train.bf16: auto`) and attention kernel as in
training. Timed: the median of `--steps` optimizer steps after two warm-up steps, (a) through a
DeepSpeed ZeRO-2 engine configured as the cell's, (b) as a bare loop (forward, backward, clip, AdamW,
zero_grad) on an identical copy of the model, its steps alternating with (a)'s so that the overhead
ratio (the median of per-pair ratios) is not the host's drift between two blocks of steps, (c) through
the engine with `train.compile`'s compiled decoder layers, after a first step that compiles them
(inductor's cache cold, then warm).
Peak: the best of fp32 and bf16 square matmuls (n = 2048) at the same thread count, measured in the
same run (bf16 only where the CPU has it natively: elsewhere a 2048² bf16 matmul takes seconds); MFU is
reported against both. `mfu_paired` (and `_compiled`) divide each timed engine step's model FLOP/s by a
peak matmul (best of two, the faster dtype) timed right after that step, and take the median over
steps: this shared host's speed drifts by a third within an hour, so a peak taken minutes earlier
misstates a step's share of it. A torch profile of one engine step, eager and compiled (each also by
input shape), says where the time goes, and for the first case the bare step is re-timed with SDPA
and eager attention, each with the paper's LoRA dropout (0.05) and without (costs, not recipe
changes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from record import write_result  # bench/ is on sys.path when a script runs

from retrieval_scaling.precision import use_bf16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = "tiny_l/dense/cl,tiny_s/sparse/cl,smollm2_135m/dense/cl"
# As the cells train on this machine (train.bf16: auto).
BF16 = use_bf16("auto", "cpu")


class MatmulPeak:
    """FLOP/s of square matmuls (n × n, `dtype`) on `device` at the current thread count, the best of
    `repeats` each call (CUDA: each timed to its completion). Called between timed steps too, so that
    each step has a peak measured next to it: this shared host's speed drifts within minutes."""

    def __init__(self, dtype, n: int = 2048, device: str = "cpu"):
        import torch

        self.n = n
        self.a = torch.randn(n, n, dtype=dtype, device=device)
        self.b = torch.randn(n, n, dtype=dtype, device=device)
        self.sync = torch.cuda.synchronize if self.a.is_cuda else (lambda: None)
        for _ in range(3):
            torch.mm(self.a, self.b)

    def __call__(self, repeats: int = 2) -> float:
        import torch

        best = float("inf")
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            torch.mm(self.a, self.b)
            self.sync()
            best = min(best, time.perf_counter() - start)
        return 2 * self.n**3 / best


def peak_matmul_flops(dtype, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """FLOP/s of the best of `repeats` square matmuls (see `MatmulPeak`)."""
    return MatmulPeak(dtype, n, device)(repeats)


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("config", overrides=overrides), resolve=True)


def case_config(case: str) -> dict:
    model, paradigm, loss = case.split("/")
    if model == "smollm2_135m":  # the real-model cell at the shapes `make smoke-real` trains
        return compose([f"paradigm={paradigm}", f"loss={loss}", "+grid=smoke_real", "hydra.mode=RUN",
                        f"model.recipe.{loss}.queries=4", f"model.recipe.{loss}.passages_per_query=4"])
    return compose([f"model={model}", f"paradigm={paradigm}", f"loss={loss}"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_steps(step_fn, steps: int) -> list[float]:
    for _ in range(2):
        step_fn()
    return [timed(step_fn) for _ in range(steps)]


def paired_steps(step_fn, steps: int, peak: MatmulPeak) -> tuple[list[float], list[float]]:
    """Step times and the peak matmul FLOP/s measured right after each, for `steps` steps after two
    warm-up steps: an MFU per step against the machine's speed of that moment."""
    for _ in range(2):
        step_fn()
    times, peaks = [], []
    for _ in range(steps):
        times.append(timed(step_fn))
        peaks.append(peak())
    return times, peaks


def bare_loop(step, clip: float):
    """One optimizer step of a bare torch + peft loop over `step`'s batch: forward, backward, clip,
    AdamW, zero_grad."""
    import torch

    params = [p for p in step.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def one():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = step.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return one


def bare_step_time(cfg: dict, steps: int, attn: str) -> float:
    """Median step time of the bare loop for a config (used for the ablations below)."""
    from retrieval_scaling.backbone import lora_inputs_uncast
    from retrieval_scaling.flopcheck import RandomStep

    step = RandomStep(cfg, attn_implementation=attn)
    with lora_inputs_uncast(step.encoder, BF16):  # as the cell trains
        return statistics.median(timed_steps(bare_loop(step, float(cfg["train"]["grad_clip"])), steps))


def ablations(case: str, steps: int) -> dict:
    """Where the time beyond matmuls goes, as step times of the bare loop with the attention kernel
    and LoRA dropout varied (the paper's dropout is 0.05; the tiny family trains with eager attention
    and none): measurements of their cost, not recipe changes."""
    out = {}
    for attn in ("sdpa", "eager"):
        for dropout in (0.05, 0.0):
            cfg = case_config(case)
            cfg["model"]["lora"]["dropout"] = dropout
            out[f"{attn}_lora_dropout_{dropout:g}"] = bare_step_time(cfg, steps, attn)
    return out


def run_case(case: str, steps: int, profile: bool, peak: MatmulPeak) -> dict:
    from retrieval_scaling.backbone import lora_inputs_uncast
    from retrieval_scaling.flopcheck import RandomStep

    cfg = case_config(case)
    # The kernel the cell trains with (the tiny family: eager; see conf/model/_tiny_family.yaml).
    # Two copies of the same model and batch (seeded): one for the engine, one for the bare loop, so
    # that their steps can alternate (the engine's ZeRO hooks stay on its own copy).
    step, bare_step = (RandomStep(cfg, attn_implementation=cfg["model"].get("attn_implementation", "sdpa"))
                       for _ in range(2))
    with lora_inputs_uncast(step.encoder, BF16), lora_inputs_uncast(bare_step.encoder, BF16):  # as the cell trains
        return time_case(case, cfg, step, bare_step, steps, profile, peak)


def time_case(case: str, cfg: dict, step, bare_step, steps: int, profile: bool, peak: MatmulPeak) -> dict:
    import deepspeed
    import torch

    from retrieval_scaling.cell_model import deepspeed_config
    from retrieval_scaling.plan import plan_cell
    from retrieval_scaling.train import compiled_layers

    plan = plan_cell(cfg)
    params = [p for p in step.encoder.parameters() if p.requires_grad]
    clip = float(cfg["train"]["grad_clip"])

    # (a) the cell's DeepSpeed engine, (b) a bare torch + peft loop: steps alternate, each engine step
    # followed by a peak matmul
    ds_cfg = {**deepspeed_config(cfg), "train_micro_batch_size_per_gpu": step.queries,
              "gradient_accumulation_steps": 1, "gradient_clipping": clip, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=step.encoder, optimizer=torch.optim.AdamW(params, lr=1e-5),
                                           config=ds_cfg)

    def engine_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = step.loss(engine)
        engine.backward(loss)
        engine.step()

    bare_one = bare_loop(bare_step, clip)
    for _ in range(2):  # warm-up
        bare_one()
        engine_step()
    bare, ds, ds_peaks = [], [], []
    for _ in range(steps):
        bare.append(timed(bare_one))
        ds.append(timed(engine_step))
        ds_peaks.append(peak())
    top_ops, top_shapes = profile_ops(engine_step) if profile else ([], [])

    # (c) the same engine with train.compile's compiled decoder layers: first step (compilation, with
    # inductor's on-disk cache cold, then warm as a later cell finds it), then timed steps.
    compiled = {}
    for cache in ("cold", "warm"):
        torch._dynamo.reset()
        with compiled_layers(step.encoder, True):
            start = time.perf_counter()
            engine_step()
            compiled[f"compile_{cache}_s"] = time.perf_counter() - start
            if cache == "cold":
                ds_compiled, compiled_peaks = paired_steps(engine_step, steps, peak)
                top_ops_compiled, top_shapes_compiled = profile_ops(engine_step) if profile else ([], [])
    flops = plan["flops_per_step"]
    return {"case": case, "batch": f"{step.queries}x{step.group}", "lengths": f"{step.query_len}/{step.passage_len}",
            "flops_per_step": flops, "step_s_deepspeed": statistics.median(ds),
            "step_s_bare": statistics.median(bare),
            # each engine step over the bare step just before it, the median over steps
            "engine_overhead": statistics.median(d / b for d, b in zip(ds, bare, strict=True)),
            "model_flops_per_s": flops / statistics.median(ds), "profile_top_ops": top_ops,
            "profile_top_ops_by_shape": top_shapes,
            "step_s_deepspeed_compiled": statistics.median(ds_compiled), **compiled,
            "model_flops_per_s_compiled": flops / statistics.median(ds_compiled),
            "profile_top_ops_compiled": top_ops_compiled, "profile_top_ops_compiled_by_shape": top_shapes_compiled,
            # each step against the peak measured right after it, the median over steps
            "mfu_paired": statistics.median(flops / t / p for t, p in zip(ds, ds_peaks, strict=True)),
            "mfu_paired_compiled": statistics.median(flops / t / p
                                                     for t, p in zip(ds_compiled, compiled_peaks, strict=True)),
            "peak_during_steps": statistics.median(ds_peaks + compiled_peaks)}


def profile_ops(step_fn, top: int = 12) -> tuple[list[dict], list[dict]]:
    """Where one step's time goes (torch profiler): the ops with the most self CPU time, and the same
    split by input shapes (which matmul or element-wise pass: e.g. LoRA's rank-r products)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step_fn()

    def rows(events, shapes: bool) -> list[dict]:
        events = sorted(events, key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) or 1
        return [{"op": e.key, **({"shapes": str(e.input_shapes)} if shapes else {}),
                 "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
                 "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in events[:top]]

    return rows(prof.key_averages(), False), rows(prof.key_averages(group_by_input_shape=True), True)


def main() -> None:
    import torch

    from retrieval_scaling.distributed import init_distributed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # A fresh inductor cache, so that `compile_cold_s` is what a sweep's first cell pays.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-inductor-")
    init_distributed()
    fp32 = MatmulPeak(torch.float32)
    peak_fp32, peak_bf16 = fp32(10), MatmulPeak(torch.bfloat16)(10) if BF16 else None
    # Steps are paired with the best peak's dtype (bf16 where autocast runs it natively and it is faster).
    paired = MatmulPeak(torch.bfloat16) if peak_bf16 and peak_bf16 > peak_fp32 else fp32
    cases = [run_case(c, args.steps, profile=True, peak=paired) for c in args.cases.split(",")]
    cases[0]["ablation_step_s"] = ablations(args.cases.split(",")[0], args.steps)
    for c in cases:
        c["mfu_vs_fp32_peak"] = c["model_flops_per_s"] / peak_fp32
        c["mfu_vs_best_peak"] = c["model_flops_per_s"] / max(peak_fp32, peak_bf16 or 0)
        c["mfu_vs_fp32_peak_compiled"] = c["model_flops_per_s_compiled"] / peak_fp32
    result = {"benchmark": "train_step", "threads": args.threads, "peak_fp32_matmul_flops": peak_fp32,
              "peak_paired_dtype": str(paired.a.dtype).removeprefix("torch."),
              "peak_bf16_matmul_flops": peak_bf16, "bf16_autocast": BF16,
              "cases": cases}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
