"""Turn the JSON lines of a benchmark run (bench/gpu_all.sh's results.jsonl) into BENCHMARKS.md table rows.

    python bench/to_markdown.py /path/to/results.jsonl

One row per measurement: benchmark and setting, ours, the peer (named), the ratio ours / peer, the machine. A line
that records a failed step (``{"bench": ..., "error": ...}``) becomes a row saying so, so a gap is never silent.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(x: float | None, unit: str) -> str:
    return "-" if x is None else f"{x:,.1f} {unit}"


def rows(result: dict) -> list[tuple[str, str, str, str, str]]:
    """(what, ours, peer, ratio, machine) for one benchmark's JSON line."""
    bench = result.get("bench", "?")
    if "error" in result:
        return [(bench, "-", "-", f"not measured ({result['error']})", "-")]
    if bench == "augment":
        tag = " compiled" if result["compile"] else ""
        tag += " bf16" if result["bf16"] else ""
        return [(f"two-view augmentation {r['size']} px, batch {r['batch']}{tag}", _num(r["ours_img_s"], "img/s"),
                 f"kornia {_num(r['kornia_img_s'], 'img/s')}", f"{r['ratio']:.2f}x", result["card"])
                for r in result["rows"]]
    if bench == "loader":
        return [(f"decode + two views, {result['images']} JPEGs, {result['size']} px",
                 _num(result["ours_img_s"], "img/s"), f"PIL + torchvision v2, 1 core {_num(result['peer_img_s'], 'img/s')}", f"{result['ratio']:.2f}x",
                 result["card"])]
    if bench == "decode_ahead":
        return [(f"decode: device step, {result['model']} {result['size']} px, batch {result['batch']} "
                 f"(floor {result['floor_ms']:.1f} ms)", f"ahead {result['ahead_ms']:.1f} ms/step",
                 f"moved + decoded in step {result['before_ms']:.1f} ms/step", f"{result['ratio']:.2f}x", result["card"])]
    if bench == "byol_step":
        tag = {"step": " compiled (whole step)", True: " compiled"}.get(result["compile"], "")
        return [(f"BYOL step {result['encoder']} {result['size']} px, batch {result['batch']}{tag}",
                 _num(result["ours_img_s"], "img/s"), f"byol-pytorch {_num(result['byol_pytorch_img_s'], 'img/s')}",
                 f"{result['ratio']:.2f}x", result["machine"])]
    if bench == "lm_step":
        res = result["results"]
        ours = next(iter(res))
        mfu = res[ours]["mfu"]
        peers = ", ".join(f"{k} {_num(v['tok_s'], 'tok/s')}" for k, v in res.items() if k != ours)
        return [(f"LM step ({result['size']}, {result['params'] / 1e6:.0f}M params, seq {result['seq']})",
                 _num(res[ours]["tok_s"], "tok/s") + (f" ({100 * mfu:.1f}% MFU)" if mfu else ""), peers,
                 f"{result['ratio']:.2f}x", result["device"])]
    if bench == "probe":
        return [(f"probe fast vs protocol ({result['backbone']}, {result['epochs']} epochs)",
                 f"{result['fast_s']:.2f} s", f"protocol mode {result['protocol_s']:.2f} s",
                 f"{result['ratio']:.2f}x (top-1 diff {result['top1_diff']:.2f})", result["device"])]
    if bench == "probe_scale":
        k = result.get("extract_devices", 1)
        split = f", extraction {_num(result['extract_img_s_1proc'], 'img/s')} on 1 process" + (
            f" vs {_num(result[f'extract_img_s_{k}proc'], 'img/s')} on {k}" if k > 1 else "")
        return [(f"probe protocol, k-lr grid in one pass ({result['backbone']}, {result['protocol_n']} images{split})",
                 f"{result['protocol_one_pass_s']:.2f} s", f"k one-lr passes {result['protocol_k_passes_s']:.2f} s",
                 f"{result['protocol_ratio']:.2f}x", result["device"])]
    return [(bench, "-", "-", f"{result.get('ratio', '-')}", "-")]


def to_markdown(lines: list[str]) -> str:
    """The table for the given JSON lines (blank lines ignored)."""
    out = ["| benchmark | ours | peer | ratio | machine |", "|---|---|---|---|---|"]
    for line in lines:
        if line.strip():
            out += ["| " + " | ".join(r) + " |" for r in rows(json.loads(line))]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python bench/to_markdown.py RESULTS.jsonl")
    print(to_markdown(Path(args[0]).read_text().splitlines()))


if __name__ == "__main__":
    main()
