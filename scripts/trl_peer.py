#!/usr/bin/env python3
"""Run Hugging Face TRL's PyTorch DPO path on a batch file, for cross-checks and peer timing.

The logits-to-log-prob step is TRL's own `trl.trainer.utils.selective_log_softmax` (its
PyTorch path on a CPU); the masked sum, the loss formulas, the rewards and the metrics follow
`DPOTrainer._compute_loss` of TRL 1.16, and conservative label smoothing follows TRL 0.28's
sigmoid loss. The gradient comes from PyTorch autograd.

    python scripts/trl_peer.py check BATCH [--beta B] [--label-smoothing E]
        prints one JSON object with the loss, per-pair values, metrics and gradient norms
    python scripts/trl_peer.py time --pairs 4 --seq-len 512 --vocab 32000 --dtype bf16
        prints the median forward and forward+backward times in ms (JSON)

Needs torch, trl and safetensors (scripts/peer-env.sh installs them); never used by CI.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open
from trl.trainer.utils import selective_log_softmax


def dpo_forward(logits, labels, reference, beta, label_smoothing, ignore_index, vocab):
    """Returns (loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)."""
    mask = labels != ignore_index
    index = torch.where(mask, labels, torch.zeros_like(labels))
    real = logits[..., :vocab]
    per_token = selective_log_softmax(real, index)
    logps = (per_token * mask).sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    ref_chosen, ref_rejected = reference.chunk(2, dim=0)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    delta = chosen_logratios - rejected_logratios
    losses = (
        -F.logsigmoid(beta * delta) * (1 - label_smoothing)
        - F.logsigmoid(-beta * delta) * label_smoothing
    )
    return (
        losses.mean(),
        losses,
        chosen_logps,
        rejected_logps,
        beta * chosen_logratios.detach(),
        beta * rejected_logratios.detach(),
    )


def check(args):
    with safe_open(args.batch, framework="pt") as f:
        metadata = f.metadata() or {}
        logits = f.get_tensor("policy_logits")
        labels = f.get_tensor("labels").long()
        names = set(f.keys())
        reference = (
            f.get_tensor("reference_logps").double()
            if "reference_logps" in names
            else torch.zeros(labels.shape[0], dtype=torch.float64)
        )
    vocab = int(metadata.get("vocab_size", logits.shape[-1]))
    beta = args.beta if args.beta is not None else float(metadata.get("beta", 0.1))
    eps = (
        args.label_smoothing
        if args.label_smoothing is not None
        else float(metadata.get("label_smoothing", 0.0))
    )
    ignore_index = int(metadata.get("ignore_index", -100))
    logits = logits.double().requires_grad_(True)
    loss, losses, chosen, rejected, chosen_rewards, rejected_rewards = dpo_forward(
        logits, labels, reference, beta, eps, ignore_index, vocab
    )
    loss.backward()
    grad = logits.grad
    result = {
        "loss": loss.item(),
        "losses": losses.tolist(),
        "chosen_logps": chosen.tolist(),
        "rejected_logps": rejected.tolist(),
        "chosen_rewards": chosen_rewards.tolist(),
        "rejected_rewards": rejected_rewards.tolist(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
        "grad_abs_sum": grad.abs().sum().item(),
        "grad_max_abs": grad.abs().max().item(),
    }
    print(json.dumps(result))


def time_peer(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    rows = 2 * args.pairs
    logits = (torch.randn(rows, args.seq_len, args.vocab) * 2).to(dtype)
    labels = torch.randint(0, args.vocab, (rows, args.seq_len))
    labels[:, : args.seq_len // 2] = -100
    reference = torch.randn(rows, dtype=torch.float32) - 100.0

    def forward_only():
        with torch.no_grad():
            dpo_forward(logits, labels, reference, 0.1, 0.0, -100, args.vocab)[0].item()

    def forward_backward():
        x = logits.detach().requires_grad_(True)
        loss = dpo_forward(x, labels, reference, 0.1, 0.0, -100, args.vocab)[0]
        loss.backward()
        assert x.grad is not None

    report = {"threads": args.threads, "torch": torch.__version__}
    for name, fn in [("forward_ms", forward_only), ("forward_backward_ms", forward_backward)]:
        fn()
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        report[name] = statistics.median(samples)
    print(json.dumps(report))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="run TRL's computation on a batch file")
    c.add_argument("batch")
    c.add_argument("--beta", type=float)
    c.add_argument("--label-smoothing", type=float)
    t = sub.add_parser("time", help="time forward and forward+backward on random logits")
    t.add_argument("--pairs", type=int, default=4)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--vocab", type=int, default=32000)
    t.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="bf16")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    check(args) if args.command == "check" else time_peer(args)


if __name__ == "__main__":
    main()
