"""One optimizer step of a tiny LoRA encoder for every paradigm × loss × micro-batch size, on this
process's rank (one rank alone, or several under MASTER_ADDR/WORLD_SIZE/RANK over gloo), as `train`
takes it: `python tests/grad_cache_run.py <out.pt> [--stage N]`. Saves, for each case, the step's loss
and the gradients the optimizer received (after DeepSpeed's mean over ranks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

QUERIES, QUERY_LEN, PASSAGE_LEN, VOCAB = 4, 5, 7, 50
MICRO_BATCHES = (None, 1, 3)  # whole share at once; one sequence; three (uneven: 2 or 4 queries, 6 to 12 passages)
CASES = [(paradigm, loss) for paradigm in ("dense", "sparse") for loss in ("cl", "kd", "cl_kd")]


def batch(group: int):
    from retrieval_scaling.encoders import encode_inputs
    from retrieval_scaling.train import Batch

    gen = torch.Generator().manual_seed(7)

    def texts(n: int, longest: int) -> list[list[int]]:  # variable lengths: left padding in every batch
        return [torch.randint(3, VOCAB, (int(torch.randint(2, longest, (1,), generator=gen)),),
                              generator=gen).tolist() for _ in range(n)]

    q_ids, q_mask = encode_inputs(texts(QUERIES, QUERY_LEN), 1, 2, QUERY_LEN, pad_to=QUERY_LEN)
    p_ids, p_mask = encode_inputs(texts(QUERIES * group, PASSAGE_LEN), 1, 2, PASSAGE_LEN, pad_to=PASSAGE_LEN)
    return Batch(q_ids, q_mask, p_ids, p_mask, torch.randn(QUERIES, group, generator=gen) * 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=0)
    args = parser.parse_args()
    from test_backbone import lora_encoder

    from retrieval_scaling.distributed import configure_threads, init_distributed
    from retrieval_scaling.gradient_cache import MicroBatches, optimizer_step
    from retrieval_scaling.losses import ContrastiveDistillationLoss, ContrastiveLoss, MarginMSELoss
    from retrieval_scaling.paradigms import paradigm_of
    from retrieval_scaling.train import StepLoss, build_engine, shard

    configure_threads(1)
    rank, world = init_distributed()
    received: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):  # what the optimizer is given: the step's mean gradient over ranks
        received.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = recording_step
    losses = {"cl": ContrastiveLoss(), "kd": MarginMSELoss(), "cl_kd": ContrastiveDistillationLoss()}
    train_cfg = {"lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.0, "grad_clip": 1e9}
    ds_cfg = {"zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    results = {}
    for paradigm, loss_name in CASES:
        group = 2 if loss_name == "kd" else 3
        flops = {"lambda_q": 0.3, "lambda_d": 0.1, "warmup_fraction": 0.0}
        settings = {"name": paradigm, "temperature": 0.05 if paradigm == "dense" else 1.0,
                    **({"flops": flops} if paradigm == "sparse" else {})}
        step_loss = StepLoss(losses[loss_name], group, paradigm_of(settings), steps=10)
        whole = batch(group)
        local = shard(whole, rank, world)
        for micro_batch in MICRO_BATCHES:
            torch.manual_seed(0)
            encoder = lora_encoder(paradigm).train()
            micro = MicroBatches.of(micro_batch, QUERIES // world, QUERIES // world * group)
            engine, _ = build_engine(encoder, micro.size, 10, train_cfg, ds_cfg, micro.backward_passes)
            engine.train()
            received.clear()
            _, _, loss, _ = optimizer_step(engine, local, micro, False,
                                           lambda q, p: step_loss(q, p, whole.teacher, 5))  # noqa: B023
            assert len(received) == 1, f"{len(received)} optimizer steps in one step"
            results[(paradigm, loss_name, micro_batch)] = {"loss": loss.item(), "grads": received[0],
                                                            "backward_passes": micro.backward_passes}
    # LoRA dropout: the second encoding of each micro-batch draws the first one's masks
    encoder = lora_encoder("sparse", dropout=0.5).train()
    micro = MicroBatches.of(3, QUERIES // world, QUERIES // world * 3)
    engine, _ = build_engine(encoder, micro.size, 10, train_cfg, ds_cfg, micro.backward_passes)
    outputs = []
    engine.register_forward_hook(lambda module, inputs, out: outputs.append(out.detach().clone()))
    whole = batch(3)
    local = shard(whole, rank, world)
    optimizer_step(engine, local, micro, False,
                   lambda q, p: StepLoss(losses["cl"], 3, paradigm_of({"name": "sparse"}), 10)(q, p, whole.teacher, 5))
    first, second = outputs[:micro.backward_passes], outputs[micro.backward_passes:]
    with torch.no_grad():  # other draws, other masks: dropout is on, so the replay is what matched them
        again = engine(local.query_ids[:3], local.query_mask[:3])
    replayed = len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    results["dropout"] = {"replayed": replayed, "masks_differ": not torch.equal(first[0], again)}
    torch.save(results, f"{args.out}.rank{rank}")


if __name__ == "__main__":
    main()
