"""lm.scaling.sweep: IsoFLOP planning, resumable CSV, the CLI (`zoo scaling sweep|fit`), one real tiny training run."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

import lm.scaling.laws as S
from lm.cli.scaling import main as scaling_main
from lm.scaling import sweep as W

SHAPES = [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 16, "n_layers": 2, "n_heads": 2},
          {"d_model": 32, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2},
          {"d_model": 48, "n_layers": 2, "n_heads": 3}, {"d_model": 64, "n_layers": 2, "n_heads": 4},
          {"d_model": 64, "n_layers": 4, "n_heads": 4}]


def make_cfg(tmp_path: Path, **kw) -> W.SweepConfig:
    base = dict(out_dir=str(tmp_path / "sweep"), shapes=SHAPES, budgets=[3e9, 1e10, 3e10],
                model_overrides={"positions": "rope"}, min_steps=10, max_steps=10**7,
                data={"seq_len": 8, "batch_size": 2})
    base.update(kw)
    return W.SweepConfig(**base)


def planted_loss(N: float, D: float, E: int = 1) -> float:
    """A Chinchilla-shaped law whose optimum sits inside the test grid (N ~ D ~ sqrt(C / 6))."""
    dense = float(S.parametric_loss(N, D, 1.0, 30.0, 30.0, 0.34, 0.34))
    c = S.ROUTED_COEFFICIENTS["s-base"]
    return dense * float(S.routed_loss(N, E, c) / S.routed_loss(N, 1, c))


class FakeTrain:
    """Stands in for training: returns the planted law (and its curve), records which runs it was asked for."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or set()

    def __call__(self, spec: W.RunSpec, cfg: W.SweepConfig) -> W.RunOutcome:
        self.calls.append(spec.run_id)
        if spec.run_id in self.fail:
            return W.RunOutcome(val_loss=math.nan, train_loss=math.nan)
        tok = np.geomspace(spec.D / 100, spec.D, 20)
        return W.RunOutcome(val_loss=planted_loss(spec.N, spec.D, spec.E), train_loss=planted_loss(spec.N, spec.D),
                            curve_tokens=tok.tolist(), curve_loss=[planted_loss(spec.N, t) for t in tok])


def test_plan_runs_places_runs_on_isoflop_lines(tmp_path):
    cfg = make_cfg(tmp_path, min_steps=200, max_steps=20000)
    plan = W.plan_runs(cfg)
    assert len({r.run_id for r in plan}) == len(plan)
    assert [r.C for r in plan] == sorted(r.C for r in plan)
    tokens_per_step = 2 * 8
    for r in plan:
        assert 200 <= r.steps <= 20000
        # D is a whole number of steps: 6ND is C up to half a step of tokens.
        assert abs(6 * r.N * r.D - r.C) <= 6 * r.N * tokens_per_step / 2 + 1e-6
        assert r.overrides["n_kv_heads"] == r.overrides["n_heads"]
        assert r.overrides["d_ff"] == 4 * r.overrides["d_model"]
        assert r.C_detailed > 6 * r.N * r.D  # tiny models: attention and logits are not in 6ND
    big = [r for r in plan if r.overrides["d_model"] == 64 and r.overrides["n_layers"] == 4]
    assert {r.C for r in big} == {1e10, 3e10}  # at 3e9 the largest model would get fewer than 200 steps
    with pytest.raises(ValueError, match="no run of the sweep"):
        W.plan_runs(make_cfg(tmp_path, min_steps=10**8, max_steps=10**9))
    with pytest.raises(ValueError, match="missing 'n_heads'"):
        W.plan_runs(make_cfg(tmp_path, shapes=[{"d_model": 16, "n_layers": 1}]))


def test_sweep_is_resumable(tmp_path):
    cfg = make_cfg(tmp_path)
    plan = W.plan_runs(cfg)
    fake = FakeTrain()
    W.run_sweep(cfg, train_fn=fake, limit=3, log=lambda s: None)
    assert fake.calls == [r.run_id for r in plan[:3]]
    csv_path = Path(cfg.out_dir) / "runs.csv"
    assert len(W.read_results(csv_path)) == 3
    fake2 = FakeTrain()
    written, failed = W.run_sweep(cfg, train_fn=fake2, log=lambda s: None)
    assert fake2.calls == [r.run_id for r in plan[3:]] and not failed  # finished rows are skipped
    rows = W.read_results(csv_path)
    assert [r["run_id"] for r in rows] == [r.run_id for r in plan]
    assert tuple(rows[0]) == W.COLUMNS
    assert float(rows[0]["L"]) == pytest.approx(planted_loss(plan[0].N, plan[0].D), rel=1e-5)
    curve = json.loads((Path(cfg.out_dir) / "curves" / f"{plan[0].run_id}.json").read_text())
    assert curve["N"] == plan[0].N and len(curve["tokens"]) == 20
    fake3 = FakeTrain()
    W.run_sweep(cfg, train_fn=fake3, log=lambda s: None)
    assert fake3.calls == []


def test_sweep_refuses_to_mix_settings(tmp_path):
    W.run_sweep(make_cfg(tmp_path), train_fn=FakeTrain(), limit=1, log=lambda s: None)
    changed = make_cfg(tmp_path, optim={"lr": 1e-2})
    with pytest.raises(ValueError, match="trained with different settings"):
        W.run_sweep(changed, train_fn=FakeTrain(), log=lambda s: None)


def test_sweep_refuses_to_mix_data(tmp_path):
    cfg = make_cfg(tmp_path)
    W.run_sweep(cfg, train_fn=FakeTrain(), limit=2, log=lambda s: None, data="corpus-v1")
    assert {r["data_key"] for r in W.read_results(Path(cfg.out_dir) / "runs.csv")} == {"corpus-v1"}
    with pytest.raises(ValueError, match="trained on different data"):
        W.run_sweep(cfg, train_fn=FakeTrain(), log=lambda s: None, data="corpus-v2")
    fake = FakeTrain()
    W.run_sweep(cfg, train_fn=fake, log=lambda s: None, data="corpus-v1")
    assert len(fake.calls) == len(W.plan_runs(cfg)) - 2


def test_failed_runs_are_reported_and_retried(tmp_path):
    cfg = make_cfg(tmp_path)
    plan = W.plan_runs(cfg)
    bad = plan[1].run_id
    written, failed = W.run_sweep(cfg, train_fn=FakeTrain(fail={bad}), log=lambda s: None)
    assert [f[0] for f in failed] == [bad] and "nan" in failed[0][1]
    assert bad not in {r["run_id"] for r in W.read_results(Path(cfg.out_dir) / "runs.csv")}
    retry = FakeTrain()
    W.run_sweep(cfg, train_fn=retry, log=lambda s: None)
    assert retry.calls == [bad]


def test_load_runs_csv_errors_name_column_and_row(tmp_path):
    p = tmp_path / "runs.csv"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        W.load_runs_csv(p)
    bad_files = [  # (file content, the error it must get)
        ("run_id,N,L\na,1,2\n", r"missing column\(s\) \['D'\]"),
        ("run_id,N,D,L\na,1,2,3\nb,1,2,nan\n", r"row 2 \(run b\): column 'L'"),
        ("run_id,N,D,L\na,1,2,3\nb,1,-2,3\n", r"row 2 \(run b\): column 'D' = '-2'"),
        ("run_id,N,D,L\na,1,2,x\n", r"column 'L' = 'x' is not a number"),
    ]
    for content, error in bad_files:
        p.write_text(content)
        with pytest.raises(ValueError, match=error):
            W.load_runs_csv(p)
    assert scaling_main(["fit", str(tmp_path / "nope.csv"), "--approach", "2"]) == 2


def test_load_config(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("out_dir: x\nshapes: [{d_model: 16, n_layers: 1, n_heads: 2}]\nbudgets: [1e10, 3.0e+10]\n")
    cfg = W.load_config(good)
    assert cfg.budgets == [1e10, 3e10]
    bad = tmp_path / "b.yaml"
    bad.write_text("out_dir: x\nshapes: []\nbudgets: [1]\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        W.load_config(bad)
    bad.write_text("out_dir: x\n")
    with pytest.raises(ValueError, match="missing required key"):
        W.load_config(bad)
    with pytest.raises(FileNotFoundError):
        W.load_config(tmp_path / "none.yaml")


def test_shipped_configs_plan(capsys):
    root = Path(__file__).resolve().parents[1] / "configs" / "scaling"
    cpu = W.load_config(root / "stdlib_isoflop.yaml")
    plan = W.plan_runs(cpu)
    # Sized for 2 CPU cores: compute and step count stay small, every budget has >= 3 sizes for its parabola.
    assert sum(6 * r.N * r.D for r in plan) < 2e13 and sum(r.steps for r in plan) < 45000
    for C in cpu.budgets:
        assert len({r.N for r in plan if r.C == C}) >= 3
    gpu = W.load_config(root / "gpu_isoflop.yaml")
    assert len(W.plan_runs(gpu)) > len(plan)
    assert scaling_main(["sweep", "--config", str(root / "stdlib_isoflop.yaml"), "--dry-run"]) == 0
    assert "runs, total 6ND compute" in capsys.readouterr().out


@pytest.fixture(scope="module")
def fake_sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fit")
    cfg = make_cfg(tmp)
    W.run_sweep(cfg, train_fn=FakeTrain(), log=lambda s: None)
    return Path(cfg.out_dir) / "runs.csv"


@pytest.mark.parametrize("approach", [1, 2, 3])
def test_fit_cli_prints_law_table_and_writes_plots(fake_sweep, tmp_path, capsys, approach):
    out = tmp_path / f"plots{approach}"
    rc = scaling_main(["scaling", "fit", str(fake_sweep), "--approach", str(approach), "--out", str(out),
                 "--bootstrap", "4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"Approach {approach}" in text and "compute-optimal allocation" in text
    for name in ("isoflop.png", "optimal.png") + (("envelope.png",) if approach == 1 else ()):
        assert (out / name).stat().st_size > 5000, name
    if approach == 3:  # the planted law has alpha = beta = 0.34
        assert "alpha = 0.34" in text and "beta = 0.34" in text
    else:  # equal exponents: N_opt ∝ C^0.5
        line = next(x for x in text.splitlines() if x.startswith(f"Approach {approach}"))
        a = float(line.split("C^")[1].split()[0])
        assert abs(a - 0.5) < 0.06, line


def test_fit_cli_routed_runs(tmp_path, capsys):
    cfg = make_cfg(tmp_path, shapes=SHAPES[1:6], experts=[1, 2, 4, 8, 16], budgets=[1e10, 3e10])
    W.run_sweep(cfg, train_fn=FakeTrain(), log=lambda s: None)
    rows = W.read_results(Path(cfg.out_dir) / "runs.csv")
    assert {int(r["E"]) for r in rows} == {1, 2, 4, 8, 16}
    rc = scaling_main(["fit", str(Path(cfg.out_dir) / "runs.csv"), "--approach", "2", "--out", str(tmp_path / "p")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "routed law: log10 L" in text
    assert (tmp_path / "p" / "routed.png").stat().st_size > 5000


def test_fit_cli_reports_missing_curves_and_columns(tmp_path, capsys):
    p = tmp_path / "runs.csv"
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["run_id", "N", "D", "L"])
        for i, n in enumerate([1e4, 2e4, 4e4, 8e4, 1.6e5, 3.2e5]):
            w.writerow([f"r{i}", n, 1e10 / (6 * n), planted_loss(n, 1e10 / (6 * n))])
    assert scaling_main(["fit", str(p), "--approach", "2"]) == 2
    assert "missing column(s) ['C']" in capsys.readouterr().err
    assert scaling_main(["fit", str(p), "--approach", "1"]) == 2
    assert "training curves" in capsys.readouterr().err


def test_real_tiny_sweep_trains_with_the_shared_trainer(tmp_path):
    """Two real runs: zoo Transformer + lm.CausalLM + TextDataModule on zoo.train.trainer's Trainer, a few steps each."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i}\n" * 40)
    cfg = W.SweepConfig(out_dir=str(tmp_path / "real"), shapes=[{"d_model": 16, "n_layers": 1, "n_heads": 2},
                                                                {"d_model": 16, "n_layers": 2, "n_heads": 2}],
                        budgets=[2e7], model_overrides={"positions": "rope"}, min_steps=2, max_steps=50,
                        data={"paths": [str(corpus)], "seq_len": 16, "batch_size": 4, "val_fraction": 0.25,
                              "cache_dir": str(tmp_path / "cache")},
                        val_batches=2, curve_points=4, trainer={"accelerator": "cpu"})
    written, failed = W.run_sweep(cfg, log=lambda s: None)
    assert not failed and len(written) == 2
    assert written[0]["data_key"] == W._datamodule(cfg).data_dir.name != ""
    for row in written:
        assert 0 < float(row["L"]) < 7  # below ln(259) = 5.56 give or take a few steps of noise
        assert int(row["D"]) == int(row["steps"]) * 4 * 16
        assert (Path(cfg.out_dir) / "curves" / f"{row['run_id']}.json").is_file()
    assert not list(Path(cfg.out_dir).rglob("*.ckpt"))  # the sweep's record is the CSV, not weights


def test_fit_cli_flags_unbracketed_minima(tmp_path, capsys):
    # Only the four smallest shapes at the largest budget: the planted optimum (~70k params) is above them all.
    cfg = make_cfg(tmp_path, shapes=SHAPES[:4], budgets=[3e10, 1e11])
    W.run_sweep(cfg, train_fn=FakeTrain(), log=lambda s: None)
    rc = scaling_main(["fit", str(Path(cfg.out_dir) / "runs.csv"), "--approach", "2", "--out", str(tmp_path / "p")])
    text = capsys.readouterr().out
    assert rc == 1
    assert "not bracketed" in text and "numbers above are not reliable" in text


# ------------------------------------------------------------------------------------------------ hardening
class FlatTrain(FakeTrain):
    """Every run ends at the same loss: no law can be read from such a sweep."""

    def __call__(self, spec: W.RunSpec, cfg: W.SweepConfig) -> W.RunOutcome:
        tok = np.geomspace(spec.D / 100, spec.D, 20)
        return W.RunOutcome(val_loss=2.0, train_loss=2.0, curve_tokens=tok.tolist(), curve_loss=[2.0] * 20)


@pytest.mark.parametrize("approach", [1, 2, 3])
def test_fit_cli_flat_losses_are_degenerate_not_converged(tmp_path, capsys, approach):
    cfg = make_cfg(tmp_path)
    W.run_sweep(cfg, train_fn=FlatTrain(), log=lambda s: None)
    rc = scaling_main(["fit", str(Path(cfg.out_dir) / "runs.csv"), "--approach", str(approach), "--out",
                 str(tmp_path / "p"), "--bootstrap", "0"])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert f"WARNING (Approach {approach})" in text and ("same loss" in text or "do not vary" in text), text


def test_fit_cli_exponent_outside_0_1_exits_1(tmp_path, capsys):
    # The big model leads early, the small one later: the envelope's N_opt shrinks as compute grows (a < 0).
    p = tmp_path / "runs.csv"
    (tmp_path / "curves").mkdir()
    for rid, N, lead, slope in (("big", 1e5, 3.0, 0.1), ("small", 1e4, 3.5, 0.6)):
        tok = np.geomspace(1e3, 1e6, 30) * (1e5 / N)
        loss = [lead - slope * math.log10(6 * N * t / 6e8) for t in tok]
        (tmp_path / "curves" / f"{rid}.json").write_text(json.dumps({"N": N, "tokens": tok.tolist(), "loss": loss}))
        W.append_result(p, {"run_id": rid, "N": N, "D": tok[-1], "C": 6 * N * tok[-1], "L": loss[-1], "E": 1})
    rc = scaling_main(["fit", str(p), "--approach", "1", "--out", str(tmp_path / "p")])
    text = capsys.readouterr().out
    assert rc == 1, text
    assert "WARNING (Approach 1): Approach 1 fit is degenerate" in text and "outside (0, 1)" in text
    assert "numbers above are not reliable" in text
    with pytest.warns(S.ScalingFitWarning, match="Approach 2 fit is degenerate: non-finite"):
        S.check_allocation("Approach 2", math.nan, 0.5)
    with pytest.warns(S.ScalingFitWarning, match="Approach 1 fit is degenerate: N_opt ∝ C\\^-0.027"):
        S.check_allocation("Approach 1", -0.027, 1.027)


def test_fit_cli_too_few_sizes_per_budget_exits_1(fake_sweep, tmp_path, capsys):
    rows = W.read_results(fake_sweep)
    first = rows[0]["C"]
    keep = [r for r in rows if r["C"] != first] + [r for r in rows if r["C"] == first][:2]
    p = tmp_path / "runs.csv"
    for r in keep:
        W.append_result(p, r)
    assert scaling_main(["fit", str(p), "--approach", "2", "--out", str(tmp_path / "p")]) == 1
    text = capsys.readouterr().out
    assert "WARNING (Approach 2): no law fitted" in text and "distinct model sizes" in text
    assert "Approach 2: N_opt" not in text


@pytest.mark.parametrize("approach", [1, 2, 3])
@pytest.mark.parametrize("column, value", [("C", "-1e10"), ("C", "0"), ("N", "0"), ("D", "-5"), ("L", "-1"),
                                           ("C", "inf"), ("E", "0")])
def test_fit_cli_nonpositive_values_refused_when_reading(fake_sweep, tmp_path, capsys, approach, column, value):
    rows = W.read_results(fake_sweep)
    rows[3][column] = value
    p = tmp_path / "runs.csv"
    for r in rows:
        W.append_result(p, r)
    assert scaling_main(["fit", str(p), "--approach", str(approach), "--out", str(tmp_path / "p")]) == 2
    cap = capsys.readouterr()
    assert f"row 4 (run {rows[3]['run_id']}): column {column!r} = {value!r} must be a finite positive" in cap.err
    assert len(cap.err.strip().splitlines()) == 1 and "Traceback" not in cap.err
    assert "Approach" not in cap.out and not (tmp_path / "p").exists()  # nothing fitted, printed or plotted


def test_fit_cli_unreadable_csv_names_the_file(fake_sweep, tmp_path, capsys):
    p = tmp_path / "runs.csv"
    p.write_bytes(fake_sweep.read_bytes().replace(b"d16-l1", "d16-é1".encode("latin-1"), 1))
    assert scaling_main(["fit", str(p), "--approach", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{str(p)!r} is not a UTF-8 text CSV" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="is not a UTF-8 text CSV"):
        W.read_results(p)  # the sweep's resume check reads it the same way
    assert scaling_main(["fit", str(tmp_path), "--approach", "2"]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "plots").write_text("x")
    assert scaling_main(["fit", str(fake_sweep), "--approach", "2", "--out", str(tmp_path / "plots")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_fit_cli_bad_curve_file_names_it(fake_sweep, tmp_path, capsys):
    curves = tmp_path / "curves"
    curves.mkdir()
    for f in (fake_sweep.parent / "curves").iterdir():
        (curves / f.name).write_bytes(f.read_bytes())
    victim = sorted(curves.iterdir())[0]
    victim.write_text('{"N": 10, "tokens": [1, 2]')
    assert scaling_main(["fit", str(fake_sweep), "--approach", "1", "--curves", str(curves), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"training curve {str(victim)!r} is not readable JSON" in err


def test_reports_are_written_atomically(fake_sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    assert scaling_main(["fit", str(fake_sweep), "--approach", "2", "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    import matplotlib.figure

    def broken_savefig(self, fname, **kw):
        with open(fname, "wb") as fh:  # a writer that dies half-way (disk full, killed)
            fh.write(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    assert scaling_main(["fit", str(fake_sweep), "--approach", "2", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # old plots whole, no temp files left
    # The runs CSV: a failing append leaves the finished rows as they were.
    p = tmp_path / "runs.csv"
    rows = W.read_results(fake_sweep)
    W.append_result(p, rows[0])
    old = p.read_bytes()
    monkeypatch.setattr(csv.DictWriter, "writerow", lambda self, row: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        W.append_result(p, rows[1])
    assert p.read_bytes() == old and [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_sweep_and_fit_flags_checked(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1] / "configs" / "scaling"
    assert scaling_main(["sweep", "--config", str(root / "stdlib_isoflop.yaml"), "--limit", "0",
                   "--out-dir", str(tmp_path / "s")]) == 2
    assert "--limit 0" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert scaling_main(["fit", str(tmp_path / "runs.csv"), "--approach", "3", "--bootstrap", "-1"]) == 2
    assert "--bootstrap -1" in capsys.readouterr().err
