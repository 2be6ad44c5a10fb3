#!/usr/bin/env python
"""Fine-tuning SEED-LLaMA with LoRA: tokens/s of one training step, seed_fast against peft.

The step of `seed-fast train llm` (its LLMModule loss: next-token cross entropy in fp32 over every
labelled token, our fused `lora_linear` in each of the seven LoRA projections) against what a user
of peft + transformers runs (peft's LoRA layers, `model(input_ids, labels=...)`, SDPA attention).
Same model, same adapter weights (r 16, alpha 32, dropout 0.05 on q, k, v, o, gate, up, down),
same random tokens, AdamW over the adapter, gradient checkpointing off and on.

Units: tokens/s = batch * sequence / median step time (forward, backward, optimizer step, with
`torch.cuda.synchronize()` after each on a GPU); peak GB = the most GPU memory allocated during the
steps. Before timing, each provider's loss (dropout off) is compared with peft's ("loss vs peft").

Models (random weights, real shapes; see bench_llm_decode.py): llama-7b (SEED-LLaMA 8B's LM, vocab
40194; the GPU default), llama-small (the CPU default), llama-tiny (a CI-sized check).
8 GPUs: `torchrun --nproc-per-node 8 -m seed_fast.train llm --config run.json` with
`"strategy": "fsdp"` (docs/training.md).

    python benchmarks/bench_train_llm.py [--model llama-7b] [--device cuda] [--seq 2048] [--batch 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llm_decode import MODELS, build  # noqa: E402
from common import markdown_table, time_fn, write_results  # noqa: E402

from seed_fast.lora import apply_fused_lora  # noqa: E402
from seed_fast.train.llm import LLMModule, TokenBatch  # noqa: E402


def _with_lora(llm, seed: int = 1):
    """SEED-LLaMA's adapter (peft layers) with a random non-zero B (a zero B trains from a no-op)."""
    llm.add_lora(True, fused=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return llm


def _peft_loss(llm, ids, mask):
    return llm.model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss


def _ours_loss(llm, ids, mask):
    batch = TokenBatch(ids, mask, ids, ["i2t"] * ids.shape[0])
    return LLMModule(llm)(batch)["loss"]


def providers(llm):
    """name -> (model with its adapter, loss function)."""
    peft_llm = _with_lora(llm)
    fused = copy.deepcopy(peft_llm)
    apply_fused_lora(fused.model)
    return {
        "peft + transformers SDPA": (peft_llm, _peft_loss),
        "seed_fast train llm (fused lora_linear)": (fused, _ours_loss),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (CUDA) or 128 (CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    cuda = device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    name = args.model or ("llama-7b" if cuda else "llama-small")
    seq = args.seq or (2048 if cuda else 128)
    repeats = args.repeats or (5 if cuda else 3)
    settings = [s.strip() for s in args.checkpointing.split(",") if s.strip()]
    if not settings or set(settings) - {"off", "on"}:
        p.error(f"--checkpointing takes off and / or on, got {args.checkpointing!r}")

    print(f"building {name} ({dtype}, {device}) ...", flush=True)
    provs = providers(build(name, device, dtype))
    vocab = next(iter(provs.values()))[0].model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (args.batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    want = None
    checks = {}
    for pname, (llm, loss_fn) in provs.items():  # dropout off: the same loss
        llm.model.eval()
        with torch.no_grad():
            loss = float(loss_fn(llm, ids, mask))
        want = loss if want is None else want
        checks[pname] = f"{abs(loss - want) / abs(want):.1e} rel"

    rows = []
    for ckpt in settings:
        for pname, (llm, loss_fn) in provs.items():
            base = llm.base_model
            if ckpt == "on":
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif getattr(base, "is_gradient_checkpointing", False):
                base.gradient_checkpointing_disable()
            llm.model.train()  # LoRA dropout on
            params = [q for q in llm.model.parameters() if q.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)

            def step(llm=llm, loss_fn=loss_fn, opt=opt):
                loss = loss_fn(llm, ids, mask)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            tm = time_fn(step, device, warmup=1, repeats=repeats, max_seconds=60, graph=False, host=False)
            sec = tm["median_ms"] / 1e3
            row = {
                "model": name,
                "seq": seq,
                "batch": args.batch,
                "checkpointing": ckpt,
                "provider": pname,
                "ms": f"{tm['median_ms']:.1f}",
                "iqr": f"{tm['q1_ms']:.1f}-{tm['q3_ms']:.1f}",
                "tok_s": f"{args.batch * seq / sec:.0f}",
                "peak_gb": f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "n/a",
                "check": checks[pname],
                "method": tm["method"],
            }
            rows.append(row)
            print(
                f"ckpt {ckpt:3s} {pname:42s} {row['ms']:>9s} ms  {row['tok_s']:>8s} tokens/s  "
                f"peak {row['peak_gb']} GB  loss vs peft {row['check']}",
                flush=True,
            )
            del opt
    for ckpt in settings:  # ratio to peft per setting
        ref = next(r for r in rows if r["checkpointing"] == ckpt and r["provider"].startswith("peft"))
        for r in rows:
            if r["checkpointing"] == ckpt:
                r["vs_peft"] = f"{float(r['tok_s']) / float(ref['tok_s']):.2f}x"

    columns = [
        ("checkpointing", "gradient checkpointing"),
        ("provider", "provider"),
        ("ms", "median ms / step"),
        ("iqr", "IQR ms"),
        ("tok_s", "tokens/s"),
        ("vs_peft", "vs peft"),
        ("peak_gb", "peak GB"),
        ("check", "loss vs peft"),
        ("method", "timing"),
    ]
    md = (
        f"{name} (random weights), {str(dtype).replace('torch.', '')}, batch {args.batch} x {seq} tokens; LoRA r 16, "
        "alpha 32, dropout 0.05 on the seven projections; AdamW over the adapter.\n\n"
    )
    md += markdown_table(rows, columns)
    folder = write_results(
        f"bench_train_llm_{str(dtype).replace('torch.', '')}",
        device,
        rows,
        md,
        args.out,
        {"model": name, "seq": seq, "batch": args.batch},
    )
    print(md)
    print(f"results in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
