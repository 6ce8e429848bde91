"""End-of-run announcements: outputs, summary metrics, the resume command, and the step-based progress bar."""
from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from zoo.train.announce import ModelTable, RunSummary, StepProgressBar, resume_command, step_based
from zoo.train.trainer import build_trainer, complete_trainer_kwargs


class TinyLM(LightningModule):
    summary_metrics = ("train/loss", "train/tokens_per_s", "never/logged", "explained/missing")
    summary_missing = {"explained/missing": "n/a: needs a GPU"}

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens_per_s", 1234.5)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)


def test_fit_ends_by_naming_every_output_and_the_summary_metrics(tmp_path, capsys):
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=3, enable_progress_bar=False,
                            enable_model_summary=False, log_every_n_steps=1, callbacks=[RunSummary(["zoo", "fit", "-c", "x.yaml"])])
    # last but Lightning's checkpoint callbacks: it prints after the progress bar and the other callbacks' reports
    others = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    assert isinstance(others[-1], RunSummary)
    trainer.fit(TinyLM(), _loader())
    out = capsys.readouterr().out
    tail = out[out.index("run finished at step 3 (max_steps=3 reached); outputs in "):]
    assert f"checkpoint          {tmp_path / 'checkpoints' / 'last.ckpt'}" in tail
    assert f"metrics (CSV)       {tmp_path / 'logs' / 'version_0' / 'metrics.csv'}" in tail
    assert f"TensorBoard         {tmp_path / 'tb' / 'version_0'}" in tail
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in tail
    assert "  train/tokens_per_s  1234\n" in tail and "never/logged" not in tail, tail
    assert "  explained/missing   n/a: needs a GPU\n" in tail, tail
    assert (tmp_path / "logs" / "version_0" / "metrics.csv").is_file()


def test_outputs_of_a_relative_folder_are_named_relative_to_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(default_root_dir="runs/x", accelerator="cpu", max_steps=2, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[RunSummary(["zoo", "fit"])])
    trainer.fit(TinyLM(), _loader())
    tail = capsys.readouterr().out.split("run finished at step 2", 1)[1]
    # the checkpoint callback holds an absolute folder; every line names the outputs as the user did
    assert "checkpoint          runs/x/checkpoints/last.ckpt\n" in tail, tail
    assert str(tmp_path) not in tail, tail
    from zoo.files import display_path

    assert display_path("/elsewhere/a.ckpt") == "/elsewhere/a.ckpt" and display_path(tmp_path / "a") == "a"
    # an absolute folder keeps absolute paths, whatever the working folder
    trainer = build_trainer(default_root_dir=str(tmp_path / "abs"), accelerator="cpu", max_epochs=1,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[RunSummary(["zoo", "fit"])])
    trainer.fit(TinyLM(), _loader())
    out = capsys.readouterr().out
    assert "run finished at step 4 (max_epochs=1 reached)" in out
    assert f"checkpoint          {tmp_path / 'abs' / 'checkpoints' / 'last.ckpt'}\n" in out, out


def test_interruption_prints_the_exact_resume_command(tmp_path, capsys):
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=1, logger=False,
                            enable_progress_bar=False)
    summary = RunSummary(["zoo", "fit", "--config", "my run.yaml", "--ckpt_path", "old.ckpt"])
    summary.on_exception(trainer, TinyLM(), SIGTERMException(143))
    err = capsys.readouterr().err
    assert "run preempted (SIGTERM) at step 0" in err
    assert err.strip().endswith("zoo fit --config 'my run.yaml' --ckpt_path last"), err
    summary.on_exception(trainer, TinyLM(), ValueError("not an interruption"))
    assert capsys.readouterr().err == ""


def test_resume_command_replaces_any_ckpt_path():
    assert resume_command(["zoo", "fit", "--ckpt_path=a.ckpt", "-c", "c.yaml"]) == "zoo fit -c c.yaml --ckpt_path last"
    assert "--ckpt_path last" in resume_command(None)


def test_step_based_runs_get_a_step_bar_with_eta():
    assert step_based({"max_steps": 200}) and step_based({"max_steps": 200, "max_epochs": -1})
    assert not step_based({"max_steps": 200, "max_epochs": 3}) and not step_based({"max_epochs": 3})
    bars = [c for c in complete_trainer_kwargs({"max_steps": 200})["callbacks"] if isinstance(c, StepProgressBar)]
    assert len(bars) == 1
    line = StepProgressBar.line(50, 200, 5.0, {"train/loss": 2.5})
    assert line == "step 50/200   25%  5.00 it/s  ETA 00:00:30  train/loss 2.5", line


def test_model_table_has_no_column_of_zero_flops(tmp_path, capsys):
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=1, enable_progress_bar=False,
                            logger=False, enable_checkpointing=False)
    assert sum(isinstance(c, ModelTable) for c in trainer.callbacks) == 1  # ours replaces Lightning's summary
    trainer.fit(TinyLM(), _loader())
    out = capsys.readouterr().out
    assert "Params" in out and "Linear" in out and "Trainable params: 5" in out, out
    assert "FLOPs" not in out  # TinyLM has no example_input_array: Lightning counted nothing


def test_model_table_shows_flops_when_lightning_counted_some(tmp_path, capsys):
    class WithExample(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = torch.randn(2, 4)

        def forward(self, x):
            return self.layer(x)

    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=1, enable_progress_bar=False,
                            logger=False, enable_checkpointing=False)
    trainer.fit(WithExample(), _loader())
    out = capsys.readouterr().out
    assert "FLOPs" in out and "Total FLOPs: 16" in out, out  # 2 x (4 x 1) multiply-adds, counted as 2 FLOPs each


def test_no_model_table_when_the_summary_is_turned_off():
    kwargs = complete_trainer_kwargs({"max_steps": 3, "enable_model_summary": False})
    assert not any(isinstance(c, ModelTable) for c in kwargs["callbacks"])


def test_step_bar_ends_its_line_before_lightning_reports_the_stop(tmp_path, capsys):
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=3, logger=False,
                            enable_checkpointing=False, enable_model_summary=False)
    bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar))
    bar.refresh_seconds = 0.0  # draw every step, so the last step is drawn before the final line too
    bar.interactive = True  # as on a terminal: redrawn in place
    trainer.fit(TinyLM(), _loader())
    err = capsys.readouterr().err
    # one final line, ended at the last step's epoch end (Lightning's "`Trainer.fit` stopped" comes after it),
    # and not drawn a second time by on_train_end
    assert bar._finished and err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert err.rsplit("\r", 1)[-1].startswith("step 3/3  100%"), repr(err)
    # the final line is not written again when the last redraw already shows it (a log file would hold it twice)
    assert err.count("step 3/3  100%") == 1, repr(err)


def test_off_a_terminal_every_run_writes_a_first_line_then_one_per_tenth(tmp_path, capsys):
    # pytest's captured stdout is not a terminal: epoch-bounded runs get the line bar instead of rich's
    kwargs = complete_trainer_kwargs({"max_epochs": 5})
    bars = [c for c in kwargs["callbacks"] if isinstance(c, StepProgressBar)]
    assert len(bars) == 1 and not any(type(c).__name__ == "RichProgressBar" for c in kwargs["callbacks"])
    trainer = build_trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_epochs=5, logger=False,
                            enable_checkpointing=False, enable_model_summary=False)
    bar = next(c for c in trainer.callbacks if isinstance(c, StepProgressBar))
    bar.interactive = False  # as in a log file (whatever the test runner's stderr is)
    trainer.fit(TinyLM(), _loader())  # 4 batches x 5 epochs = 20 steps
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]  # not Lightning's INFO lines
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    # a first line after the first step (a log shows at once that training started), then one per tenth; the last
    # is not repeated
    assert steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20], lines
    assert lines[0].startswith("epoch 1/5  step 1/20    5%") and "ETA --:--:--" in lines[0] and lines[-1].startswith("epoch 5/5  step 20/20  100%")
    assert "train/loss" in lines[-1]


def test_step_bar_line_without_a_known_total():
    assert StepProgressBar.line(7, 0, 7.0, {}) == "step 7  7.00 it/s"
    assert StepProgressBar.line(7, 70, 7.0, {}, epoch=(1, 10)).startswith("epoch 1/10  step 7/70   10%")
    # the rate is not known before a second step: no ETA yet rather than one skewed by the first step's start-up
    assert "ETA --:--:--" in StepProgressBar.line(1, 70, 0.0, {})
