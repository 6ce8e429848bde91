"""The prepared GPU benchmark run (bench/gpu_all.sh) in its CPU smoke mode: every benchmark script runs end to end
against its peer and leaves a result line, so the one GPU call a lucky session gets cannot fail on plumbing."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_smoke_mode_runs_every_benchmark_against_its_peer(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "SMOKE": "1", "OUT": str(tmp_path), "BUDGET": "900",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines() if x.strip()]
    log = (tmp_path / "log.txt").read_text()
    assert [r["bench"] for r in lines] == ["augment", "augment", "loader", "decode_ahead", "byol_step", "lm_step",
                                           "probe", "probe_scale"], log[-3000:]
    for r in lines:
        assert "error" not in r, (r, log[-3000:])
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
    assert [r["compile"] for r in lines[:2]] == [False, True]
    assert lines[3]["before_ms"] > 0 and lines[3]["ahead_ms"] > 0 and lines[3]["floor_ms"] > 0  # decode_ahead
    others = lines[:3] + lines[4:]
    assert others[2]["bad"] == 0 and others[2]["ours_img_s"] > 0 and others[2]["peer_img_s"] > 0
    assert others[3]["ours_img_s"] > 0 and others[3]["byol_pytorch_img_s"] > 0
    lm = others[4]["results"]  # same weights, same batch: the same first loss (fp32 on CPU)
    assert abs(lm["zoo"]["first_loss"] - lm["transformers-eager"]["first_loss"]) < 1e-3
    assert others[5]["top1_diff"] == 0.0  # fast and protocol probes agree
    assert others[6]["protocol_one_pass_s"] > 0 and others[6]["extract_img_s_1proc"] > 0  # issue 30's probe at scale
    assert "torch " in log and "== done in" in log
    table = [x for x in log.splitlines() if x.startswith("| ")]  # the BENCHMARKS.md rows the run ends with
    assert len(table) == 1 + len(lines) and not any("not measured" in x for x in table), table


def test_markdown_rows_name_the_peer_and_say_when_a_step_failed():
    sys.path.insert(0, str(ROOT))
    from bench.to_markdown import to_markdown

    ok = {"bench": "byol_step", "encoder": "resnet50", "size": 224, "batch": 256, "compile": True,
          "ours_img_s": 2300.0, "byol_pytorch_img_s": 900.0, "ratio": 2.556, "machine": "NVIDIA H100 80GB HBM3"}
    failed = {"bench": "lm_step", "error": "TIMEOUT"}
    table = to_markdown([json.dumps(ok), "", json.dumps(failed)]).splitlines()
    assert table[2] == ("| BYOL step resnet50 224 px, batch 256 compiled | 2,300.0 img/s | byol-pytorch 900.0 img/s "
                        "| 2.56x | NVIDIA H100 80GB HBM3 |")
    assert table[3] == "| lm_step | - | - | not measured (TIMEOUT) | - |"
