"""``lm.Distill``: Gemma 2-style distillation. A frozen teacher gives next-token distributions; the student
minimises the cross-entropy against them, sum_x -P_teacher(x) log P_student(x) = KL(P_t || P_s) + H(P_t).

Two target modes:

* full distribution (``top_k=None``): the teacher runs alongside the student on every batch;
* stored subset (``top_k=k``): a precompute step runs the teacher once over the training windows and stores, per
  position, k token ids and their teacher probabilities (``subset="topk"``: the k most likely; ``"sample"``: k
  drawn without replacement in proportion to the teacher's probabilities, Gumbel-top-k, as Gemma 2 samples) in
  memory-mapped ``.npy`` files next to the token cache.

Residual mass, handled explicitly: the stored k ids carry mass S = sum_k p_k; the remaining r = 1 - S is one extra
"everything else" outcome. The loss is the exact cross-entropy on that coarsened (k + 1)-outcome distribution,

    - sum_k p_k log q_k  -  r log(1 - sum_k q_k),

with log(1 - sum_k q_k) computed stably as logsumexp of the student's logits outside the stored ids minus the
logsumexp of all of them. It is minimised exactly when the student matches every stored probability and puts mass r
on the rest (how the student spreads r inside the rest is left to the data, as nothing is known about it).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zoo
from lm.modules.base import LMModule, check_data_fits, split_batch
from zoo.weights.lm import read_lm_checkpoint, resolve_checkpoint

SUBSETS = ("topk", "sample")


# ----------------------------------------------------------------------------------------------------------------
# Pure losses
# ----------------------------------------------------------------------------------------------------------------
def soft_cross_entropy(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Per-position cross-entropy -sum_x p_t(x) log q_s(x) over the last dimension (float32)."""
    return -(teacher_probs.float() * student_logits.float().log_softmax(-1)).sum(-1)


def kl_divergence(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Per-position KL(p_t || q_s) over the last dimension (0 log 0 = 0)."""
    p = teacher_probs.float()
    log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
    return (p * (log_p - student_logits.float().log_softmax(-1))).sum(-1)


def entropy(probs: Tensor) -> Tensor:
    """Per-position Shannon entropy in nats over the last dimension."""
    p = probs.float()
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def subset_cross_entropy(student_logits: Tensor, ids: Tensor, probs: Tensor) -> Tensor:
    """Cross-entropy against k stored teacher probabilities plus one residual outcome (see module docstring).

    student_logits [..., V]; ids [..., k] (int64); probs [..., k] teacher probabilities of those ids. Returns [...].
    """
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, -1)
    log_q = logits.gather(-1, ids) - log_z[..., None]
    p = probs.float()
    stored = -(p * log_q).sum(-1)
    residual = (1.0 - p.sum(-1)).clamp_min(0.0)  # float16 storage can overshoot 1 by a hair
    outside = logits.scatter(-1, ids, float("-inf"))
    log_rest = torch.logsumexp(outside, -1) - log_z  # -inf when the k ids cover the vocabulary
    # No rest term when nothing is left (r = 0) or nothing is outside (ids cover V, r is float rounding):
    # 0 * -inf would be nan, and 1e-7 * -inf would be inf.
    has_rest = (residual > 0) & torch.isfinite(log_rest)
    rest_term = torch.where(has_rest, -residual * log_rest.clamp_min(-1e4), torch.zeros_like(residual))
    return stored + rest_term


def select_subset(teacher_logits: Tensor, k: int, subset: str, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor]:
    """k token ids per position and their teacher probabilities: the top-k, or k sampled without replacement."""
    if subset not in SUBSETS:
        raise ValueError(f"subset={subset!r}; choose one of {SUBSETS}")
    log_p = teacher_logits.float().log_softmax(-1)
    k = min(k, log_p.shape[-1])
    if subset == "topk":
        ids = log_p.topk(k, -1).indices
    else:
        # Gumbel-top-k: the k largest of log p + Gumbel noise are a sample without replacement from p.
        u = torch.rand(log_p.shape, generator=generator, device=log_p.device if generator is None else "cpu")
        gumbel = -torch.log(-torch.log(u.to(log_p.device).clamp(1e-20, 1 - 1e-7)))
        ids = (log_p + gumbel).topk(k, -1).indices
    return ids, log_p.gather(-1, ids).exp()


# ----------------------------------------------------------------------------------------------------------------
# Precompute: teacher targets stored once to disk
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def precompute_teacher_targets(teacher: nn.Module, windows: Any, out_dir: str | Path, k: int, subset: str = "topk",
                               batch_size: int = 16, device: str | torch.device = "cpu", seed: int = 0,
                               progress: bool | None = None) -> Path:
    """Run the teacher over every window of ``windows`` once; write ids.npy [N, T, k] and probs.npy (float16).

    ``progress``: draw done/total batches and an ETA on stderr (None: a bar on a terminal, whole lines elsewhere;
    False: nothing; the precompute of a real corpus takes tens of seconds before the first training step).
    """
    from zoo.train.progress import track

    out = Path(out_dir)
    if (out / "meta.json").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n, t = len(windows), windows.seq_len
    vocab = teacher.config.vocab_size
    id_dtype = np.uint16 if vocab <= 2**16 else np.int32
    ids_mm = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=id_dtype, shape=(n, t, k))
    probs_mm = np.lib.format.open_memmap(tmp / "probs.npy", mode="w+", dtype=np.float16, shape=(n, t, k))
    gen = torch.Generator().manual_seed(seed)
    teacher = teacher.to(device).eval()
    was_index = getattr(windows, "return_index", False)
    windows.return_index = False
    starts = range(0, n, batch_size)
    try:
        for start in track(starts, f"teacher {subset}-{k} targets ({n} windows, batches)", enabled=progress):
            idx = range(start, min(n, start + batch_size))
            tokens = torch.stack([windows[i] for i in idx]).to(device)
            logits = teacher(tokens[:, :-1])
            ids, probs = select_subset(logits, k, subset, gen)
            ids_mm[start : start + len(idx)] = ids.cpu().numpy().astype(id_dtype)
            probs_mm[start : start + len(idx)] = probs.cpu().numpy().astype(np.float16)
    finally:
        windows.return_index = was_index
    ids_mm.flush()
    probs_mm.flush()
    del ids_mm, probs_mm
    (tmp / "meta.json").write_text(json.dumps({"k": k, "subset": subset, "windows": n, "seq_len": t,
                                               "vocab_size": vocab, "seed": seed}))
    try:
        tmp.rename(out)
    except OSError:
        if not (out / "meta.json").is_file():
            raise
    return out


# ----------------------------------------------------------------------------------------------------------------
# LightningModule
# ----------------------------------------------------------------------------------------------------------------
class Distill(LMModule):
    """Train ``student`` on a frozen teacher's next-token distributions (full, or a stored top-k / sampled subset).

    Args:
        student: registry name of the student Transformer.
        teacher: registry name of a teacher with random weights (tests, ablations); or use teacher_ckpt.
        teacher_ckpt: the teacher as an LM checkpoint or run folder (read by zoo.load_lm).
        student_overrides: TransformerConfig fields of the student to override.
        teacher_overrides: TransformerConfig fields of a ``teacher`` given by name to override.
        top_k: stored targets per position (None: the teacher's full distribution every step).
        subset: "topk" (the k most likely) or "sample" (k drawn without replacement, as Gemma 2).
        hard_weight: weight of the plain next-token loss added to the distillation loss.
        precompute_batch_size: teacher batch size of the stored-target precompute.
        seed: sampling seed of the stored-target precompute.
        **kwargs: the optimisation and logging options of lm.LMModule (lr, weight_decay, warmup_steps, ...).
    """

    def __init__(self, student: str = "gemma2-tiny", teacher: str | None = None, teacher_ckpt: str | None = None,
                 student_overrides: dict[str, Any] | None = None, teacher_overrides: dict[str, Any] | None = None,
                 top_k: int | None = None, subset: str = "topk", hard_weight: float = 0.0,
                 precompute_batch_size: int = 16, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if teacher is None and teacher_ckpt is None:
            raise ValueError("Distill needs a teacher: pass teacher_ckpt (a CausalLM checkpoint or run folder) "
                             "or teacher (a zoo model name)")
        if subset not in SUBSETS:
            raise ValueError(f"subset={subset!r}; choose one of {SUBSETS}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (full distribution), got {top_k}")
        self.declare_model(student, student_overrides, key="student")
        if teacher_ckpt is not None:
            self.teacher_name = f"checkpoint {teacher_ckpt}"
            # Read now (not at configure_model) so a wrong path or vocabulary is refused before training.
            self._teacher_ckpt = read_lm_checkpoint(teacher_ckpt)
            t_config = zoo.create(self._teacher_ckpt.model, device="meta", **self._teacher_ckpt.overrides).config
        else:
            self.teacher_name, self._teacher_ckpt = teacher, None
            t_config = zoo.create(teacher, device="meta", **(teacher_overrides or {})).config
        if t_config.vocab_size != self.config.vocab_size:
            raise ValueError(f"teacher ({self.teacher_name}) vocab_size={t_config.vocab_size} differs from "
                             f"student {student!r} vocab_size={self.config.vocab_size}; distillation needs one "
                             "vocabulary")
        self._teacher_config = t_config
        self.__dict__["teacher"] = None
        self._targets: tuple[np.ndarray, np.ndarray] | None = None

    def configure_model(self) -> None:
        """Build the student (trained) and the frozen teacher; each only once."""
        super().configure_model()
        if self.teacher is not None:
            return
        if self._teacher_ckpt is not None:
            t_model = zoo.create(self._teacher_ckpt.model, **self._teacher_ckpt.overrides)
            t_model.load_state_dict(self._teacher_ckpt.state_dict)
            self._teacher_ckpt = None  # the weights now live in the model; do not keep a second copy
        else:
            t_model = zoo.create(self.hparams.teacher, **(self.hparams.teacher_overrides or {}))
        t_model.eval().requires_grad_(False)
        # Kept out of the module tree: a frozen teacher is not part of the student's checkpoint or optimiser.
        self.__dict__["teacher"] = t_model

    def _teacher_on_device(self) -> nn.Module:
        self.configure_model()
        if next(self.teacher.parameters()).device != self.device:
            self.teacher.to(self.device)
        return self.teacher

    def setup(self, stage: str) -> None:
        """Check data against student and teacher; precompute and open stored targets in top-k mode."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        check_data_fits(f"teacher ({self.teacher_name})", self._teacher_config, None, getattr(dm, "seq_len", None))
        if self.hparams.top_k is None or stage != "fit":
            return
        self.configure_model()  # setup runs before Lightning's configure_model call; the precompute needs the teacher
        dm.return_index = True  # stored targets are looked up by window index
        if getattr(dm, "train_set", None) is None:
            dm.setup(stage)
        out = Path(dm.data_dir) / "teacher" / self._targets_key()
        device = self.trainer.strategy.root_device
        if self.trainer.is_global_zero:
            precompute_teacher_targets(self.teacher, dm.train_set, out, self.hparams.top_k, self.hparams.subset,
                                       self.hparams.precompute_batch_size, device, self.hparams.seed)
        self.trainer.strategy.barrier()
        self.open_targets(out)

    def _targets_key(self) -> str:
        hp = self.hparams
        src = hp.teacher_ckpt and resolve_checkpoint(hp.teacher_ckpt)
        ident = {"teacher": hp.teacher, "ckpt": src, "mtime": src and os.stat(src).st_mtime_ns,
                 "overrides": hp.teacher_overrides, "k": hp.top_k, "subset": hp.subset, "seed": hp.seed}
        if src is None:
            # A teacher built from a name is random: its weights are the identity, so hash them.
            h = hashlib.sha256()
            for p in self.teacher.state_dict().values():
                h.update(p.detach().cpu().float().numpy().tobytes())
            ident["weights"] = h.hexdigest()
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def open_targets(self, folder: str | Path) -> None:
        """Memory-map stored teacher ids/probs written by ``precompute_teacher_targets``."""
        folder = Path(folder)
        self._targets = (np.load(folder / "ids.npy", mmap_mode="r"), np.load(folder / "probs.npy", mmap_mode="r"))

    def distill_loss(self, logits: Tensor, tokens: Tensor, window_idx: Tensor | None
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean distillation cross-entropy of the student's logits on tokens[:, :-1], and extra logs."""
        logs: dict[str, Tensor] = {}
        if self.hparams.top_k is None:
            with torch.no_grad():
                p_t = self._teacher_on_device()(tokens[:, :-1]).float().softmax(-1)
            ce = soft_cross_entropy(logits, p_t)
            logs["kl"] = (ce - entropy(p_t)).mean().detach()
        else:
            if self._targets is None or window_idx is None:
                raise RuntimeError("top-k distillation needs stored targets and window indices: run it through "
                                   "a Trainer with TextDataModule (setup precomputes them)")
            rows = window_idx.cpu().numpy()
            ids = torch.from_numpy(self._targets[0][rows].astype(np.int64)).to(logits.device)
            probs = torch.from_numpy(self._targets[1][rows].astype(np.float32)).to(logits.device)
            ce = subset_cross_entropy(logits, ids, probs)
            logs["stored_mass"] = probs.sum(-1).mean()
        return ce.mean(), logs

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        """Distillation cross-entropy (+ hard_weight x next-token loss, + REINFORCE for RL-R students)."""
        window_idx, tokens = split_batch(batch)
        out, nll = self.run_model(tokens)
        ce, logs = self.distill_loss(out.logits, tokens, window_idx)
        loss = ce + self.hparams.hard_weight * nll.mean() if self.hparams.hard_weight else ce
        routing = self.routing_loss(out, nll, "train")
        self.log("train/distill_ce", ce, prog_bar=True)
        self.log("train/loss", nll.mean().detach())
        for key, value in logs.items():
            self.log(f"train/{key}", value)
        self.log_bpb("train", nll.mean())
        return loss + routing

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """Student next-token NLL (comparable with CausalLM) and the full-distribution KL to the teacher."""
        _, tokens = split_batch(batch)
        out, nll = self.run_model(tokens)
        self.accumulate_val(nll)
        p_t = self._teacher_on_device()(tokens[:, :-1]).float().softmax(-1)
        # averaged over every rank's batches (under DDP / FSDP each rank sees a different part of the split)
        self.log("val/kl_teacher", kl_divergence(p_t, out.logits).mean(), prog_bar=True, sync_dist=True,
                 batch_size=tokens.shape[0])
