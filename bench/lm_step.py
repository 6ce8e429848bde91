"""Training-step throughput: the zoo Transformer vs transformers' Gemma2ForCausalLM on the same Gemma-2-style model.

Full size (default on CUDA): d 1024, 16 layers, 8 heads / 4 kv, head 128, FFN 4096, vocab 32k, seq 2048, window
1024, attention soft-cap 50, final soft-cap 30 (285M parameters). ``--small`` (automatic without CUDA): d 256,
4 layers, vocab 4096, seq 256, window 128 -- the same switches at a size a CPU steps in a fraction of a second.

Both models start from the same weights (ours loaded from transformers' state dict), run the same step (forward,
cross-entropy, backward, AdamW), bf16 autocast on CUDA / fp32 on CPU, and are timed in interleaved rounds so load
changes on a shared machine hit both alike. MFU = tokens/s * (6 N + 6 L H hd T) / peak
(lm.parallel.flops.mfu_flops_per_token; windows not discounted). Prints a table and one JSON line whose last key is ``ratio``
(ours / fastest transformers variant).

    python bench/lm_step.py            # full size on CUDA (ours compiled with FlexAttention)
    python bench/lm_step.py --small    # CPU-sized run
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lm.parallel.flops import mfu_flops_per_token  # noqa: E402
from zoo.models.transformer import Transformer, TransformerConfig  # noqa: E402
from zoo.weights.hf import hf_names  # noqa: E402

FULL = dict(vocab=32000, d=1024, layers=16, heads=8, kv=4, hd=128, ffn=4096, seq=2048, window=1024, batch=4)
SMALL = dict(vocab=4096, d=256, layers=4, heads=4, kv=2, hd=64, ffn=1024, seq=256, window=128, batch=4)
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is left out for devices not listed (CPUs).
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def zoo_config(s: dict) -> TransformerConfig:
    """Gemma-2-style config of the given size."""
    return TransformerConfig(vocab_size=s["vocab"], d_model=s["d"], n_layers=s["layers"], n_heads=s["heads"],
                             n_kv_heads=s["kv"], head_dim=s["hd"], d_ff=s["ffn"], max_seq_len=s["seq"],
                             window=s["window"], layer_pattern=("local", "global"), attn_softcap=50.0,
                             final_softcap=30.0, post_norms=True, norm_unit_offset=True, embed_scale=True,
                             tie_embeddings=True, query_scale=s["hd"] ** -0.5)


def hf_model(s: dict, attn: str):
    """transformers' Gemma2ForCausalLM of the same size."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv"], head_dim=s["hd"],
                       intermediate_size=s["ffn"], max_position_embeddings=s["seq"], sliding_window=s["window"],
                       query_pre_attn_scalar=s["hd"], attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                       attn_implementation=attn, use_cache=False)
    return Gemma2ForCausalLM(cfg)


def make_loss(logits_of, device: torch.device, vocab: int):
    """Next-token cross-entropy of a logits function, under bf16 autocast on CUDA."""
    amp = device.type == "cuda"

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = logits_of(ids)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return loss_of


def make_step(model, loss_of, device: torch.device):
    """One training step closure: loss, backward, AdamW (fused on CUDA)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(ids: torch.Tensor) -> torch.Tensor:
        loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def timed(step, ids, n: int, device: torch.device) -> float:
    """Seconds per step over n steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; print a table and a JSON line; return the JSON dict."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized model (automatic without CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per contender (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=None, help="steps per contender per round")
    ap.add_argument("--no-compile", action="store_true", help="do not torch.compile ours on CUDA")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours on CPU too (slow to compile)")
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    ap.add_argument("--hf", default=None, help="comma list of transformers attn implementations "
                    "(default: eager on CPU; eager,flex_attention on CUDA)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    s = dict(SMALL if small else FULL)
    if args.batch:
        s["batch"] = args.batch
    warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    rounds = args.rounds if args.rounds is not None else (5 if small else 3)
    steps = args.steps if args.steps is not None else (2 if small else 10)
    hf_impls = (args.hf or ("eager" if device.type == "cpu" else "eager,flex_attention")).split(",")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)

    cfg = zoo_config(s)
    contenders: dict[str, tuple] = {}
    first_hf = None
    for impl in hf_impls:
        torch.manual_seed(0)
        m = hf_model(s, impl).to(device).train()
        first_hf = first_hf or m
        loss = make_loss(lambda ids, m=m: m(input_ids=ids).logits, device, s["vocab"])
        contenders[f"transformers-{impl}"] = (m, loss)
    ours = Transformer(cfg)
    # Same starting weights as transformers: map its state dict through the converter's name table.
    hf_sd = {k: v.detach().cpu() for k, v in first_hf.state_dict().items()}
    ours.load_state_dict({o: hf_sd[h] for o, h in hf_names(cfg, "gemma2").items()})
    ours = ours.to(device).train()
    compiled = (device.type == "cuda" or args.compile) and not args.no_compile
    loss = make_loss(ours, device, s["vocab"])
    # Ours is compiled as one graph with its loss (FlexAttention fused kernels inside); transformers runs as shipped.
    contenders = {"zoo" + (" (compiled)" if compiled else ""): (ours, torch.compile(loss) if compiled else loss),
                  **contenders}

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
    step_fns, first_loss, failed = {}, {}, {}
    for name, (model, loss_of) in contenders.items():
        try:
            step_fns[name] = make_step(model, loss_of, device)
            first_loss[name] = float(step_fns[name](ids))  # also the first warmup step
            for _ in range(max(0, warmup - 1)):
                step_fns[name](ids)
        except Exception as err:  # a peer variant that cannot run here is reported, not fatal
            if name.startswith("zoo"):
                raise
            failed[name] = f"{type(err).__name__}: {str(err)[:200]}"
            step_fns.pop(name, None)
            print(f"skipping {name}: {failed[name]}", file=sys.stderr)
    if not any(n.startswith("transformers") for n in step_fns):
        raise SystemExit(f"no transformers variant ran: {failed}")
    times: dict[str, list[float]] = {n: [] for n in step_fns}
    for _ in range(rounds):
        for name, fn in step_fns.items():
            times[name].append(timed(fn, ids, steps, device))

    tokens = s["batch"] * s["seq"]
    fpt = mfu_flops_per_token(cfg, s["seq"])
    name_dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((p for k, p in PEAKS.items() if k in name_dev), None)
    results = {}
    for name, ts in times.items():
        tok_s = tokens / statistics.median(ts)
        results[name] = {"tok_s": round(tok_s, 1), "mfu": round(tok_s * fpt / peak, 4) if peak else None,
                         "first_loss": round(first_loss[name], 5)}
    ours_name = next(iter(results))
    best_hf = max((n for n in results if n.startswith("transformers")), key=lambda n: results[n]["tok_s"])

    print(f"device: {name_dev}   size: {'small' if small else 'full'}   params: {ours.num_params():,}   "
          f"batch x seq: {s['batch']} x {s['seq']}   FLOPs/token: {fpt:.3e}   threads: {torch.get_num_threads()}")
    print(f"{'contender':<32}{'tokens/s':>12}{'MFU':>9}{'step s':>10}{'first loss':>12}")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<32}{r['tok_s']:>12,.0f}{mfu:>9}{tokens / r['tok_s']:>10.3f}{r['first_loss']:>12.4f}")
    out = {"bench": "lm_step", "date": datetime.date.today().isoformat(), "device": name_dev, "size": "small" if small else "full",
           "params": ours.num_params(), "batch": s["batch"], "seq": s["seq"], "results": results, "failed": failed,
           **{f"ratio_vs_{n}": round(results[ours_name]["tok_s"] / results[n]["tok_s"], 3)
              for n in results if n != ours_name},
           "ratio": round(results[ours_name]["tok_s"] / results[best_hf]["tok_s"], 3)}
    print(json.dumps(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
