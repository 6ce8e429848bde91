"""Who this process is in a multi-process launch, as Lightning's cluster environment sees it (SLURM, torchelastic /
torchrun, LSF, Kubeflow, or Lightning's own launcher), the scheduler's word checked against the trainer flags, and
the SLURM requeue.

Every place that asks "am I rank 0?" before the process group exists (the run lock, the rerun guard, the requeue)
asks here, so a stray ``RANK`` or ``NODE_RANK`` in a one-process run changes nothing, and ``srun`` tasks (which have
no ``RANK``) are told apart by ``SLURM_PROCID``.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import lightning.pytorch as pl

from zoo.errors import UsageError

# The signals that take the deferred save path: SIGTERM (preemption: save and exit 143) and the scheduler's
# pre-timeout signal (``sbatch --signal=USR1@90``: save, requeue the job, exit 128 + signum).
REQUEUE_SIGNALS_DEFAULT = ("SIGUSR1",)
_LAUNCHER_PID = "ZOO_LAUNCHER_PID"  # the pid of the process whose Lightning launcher starts the other local ranks
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def die_with_launcher() -> None:
    """Make a rank that Lightning's own launcher started die with the process that started it.

    For ``--devices N`` on one node without a scheduler, Lightning re-runs the command for local ranks 1..N-1
    (``LOCAL_RANK`` >= 1, no ``RANK``). If rank 0 dies (``kill -9``, the OOM killer, a signal before its handlers are
    set), such a rank waits in the rendezvous or a collective for up to half an hour, holding its memory and GPU. On
    Linux the kernel now sends it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and a rank whose parent is
    already gone stops at once. Every other process records its pid for the ranks it may start; ranks started by
    torchrun or a scheduler are left to them."""
    local, launcher = os.environ.get("LOCAL_RANK", ""), os.environ.get(_LAUNCHER_PID, "")
    started = (local.isdigit() and int(local) >= 1 and "RANK" not in os.environ and launcher.isdigit()
               and int(launcher) != os.getpid())
    if started and os.getppid() != int(launcher) and _alive(int(launcher)):
        started = False  # a variable inherited from a zoo process up the tree, not from this process's parent
    if not started:  # rank 0, one process, torchrun / scheduler ranks, or a stray LOCAL_RANK
        os.environ[_LAUNCHER_PID] = str(os.getpid())
        return
    if not die_with_parent(int(launcher)):
        raise UsageError(f"local rank {local}: the process that started it (pid {launcher}) is gone; stopping")


def die_with_parent(parent: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere
    nothing); False when the parent, pid ``parent``, is already gone (this process was orphaned before)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (another libc): nothing is lost but the cleanup
            pass
    return os.getppid() == parent


def cluster_environment(trainer: pl.Trainer) -> Any:
    """The ``ClusterEnvironment`` Lightning chose for ``trainer`` (None for a single-device strategy)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:  # Lightning internal: the connector knows it even when the strategy does not hold one
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env


def planned_world_size(trainer: pl.Trainer) -> int:
    """Processes the trainer flags ask for: devices per node x nodes."""
    return int(trainer.num_devices) * int(trainer.num_nodes)


def launched_externally(trainer: pl.Trainer) -> bool:
    """Whether every rank was started by a scheduler or launcher (srun, torchrun, jsrun...), not by Lightning."""
    env = cluster_environment(trainer)
    return planned_world_size(trainer) > 1 and env is not None and bool(env.creates_processes_externally)


def process_rank(trainer: pl.Trainer) -> int:
    """The global rank this process has (or will have once Lightning launched the others); 0 in a one-process run,
    whatever ``RANK`` / ``NODE_RANK`` the shell happens to hold."""
    if planned_world_size(trainer) <= 1:
        return 0
    env = cluster_environment(trainer)
    if env is None:
        return 0
    from lightning.fabric.plugins.environments import LightningEnvironment

    if isinstance(env, LightningEnvironment):
        # its global_rank() is only set once the process group is up; node and local rank come from the env
        local = int(os.environ.get("LOCAL_RANK", "0")) if env.creates_processes_externally else 0
        return env.node_rank() * int(trainer.num_devices) + local
    try:
        return int(env.global_rank())
    except (KeyError, ValueError):
        return 0


def check_scheduler(trainer: pl.Trainer) -> None:
    """Refuse trainer flags that contradict the scheduler's allocation (``SLURM_NTASKS=4`` with
    ``--trainer.devices 2``), in one line naming both, before anything is launched."""
    env = cluster_environment(trainer)
    have = None if env is None else _scheduler_world(env)
    if have is None:
        return
    want = planned_world_size(trainer)
    if have != want:
        raise UsageError(
            f"the scheduler started {have} processes ({_world_var(env)}={have}) but --trainer.devices "
            f"{trainer.num_devices} x --trainer.num_nodes {trainer.num_nodes} = {want}; set --trainer.devices to "
            f"the processes per node and --trainer.num_nodes to the nodes of the allocation")
    try:
        env.validate_settings(num_devices=int(trainer.num_devices), num_nodes=int(trainer.num_nodes))
    except ValueError as e:  # Lightning's own wording ends with a HINT naming the value to set
        raise UsageError(f"trainer flags contradict the scheduler: {' '.join(str(e).split())}") from None


def _scheduler_world(env: Any) -> int | None:
    """The world size the launcher announced, or None when Lightning launches the processes itself."""
    if not getattr(env, "creates_processes_externally", False):
        return None
    from lightning.fabric.plugins.environments import LightningEnvironment

    if isinstance(env, LightningEnvironment):
        return None  # LOCAL_RANK alone: Lightning's own workers or a hand launch; WORLD_SIZE may be unset
    try:
        return int(env.world_size())
    except (KeyError, ValueError, TypeError):
        return None


def _world_var(env: Any) -> str:
    name = type(env).__name__
    return {"SLURMEnvironment": "SLURM_NTASKS", "LSFEnvironment": "LSB_DJOB_RANKFILE"}.get(name, "WORLD_SIZE")


def parse_signals(names: Any) -> tuple[signal.Signals, ...]:
    """``["SIGUSR1", "USR2", 12]`` -> signal numbers; an unknown name is one line naming it."""
    if names is None:
        return ()
    if isinstance(names, (str, int)):
        names = [names]
    out = []
    for name in names:
        try:
            if isinstance(name, int) or str(name).isdigit():
                sig = signal.Signals(int(name))
            else:
                text = str(name).upper()
                sig = signal.Signals[text if text.startswith("SIG") else "SIG" + text]
        except (KeyError, ValueError):
            raise UsageError(f"trainer.requeue_signals: {name!r} is not a signal name (e.g. SIGUSR1, SIGUSR2)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT, signal.SIGTERM):
            raise UsageError(f"trainer.requeue_signals: {sig.name} cannot be a requeue signal (SIGTERM already saves "
                             "and exits; SIGINT is Ctrl-C; SIGKILL and SIGSTOP cannot be caught)")
        out.append(sig)
    return tuple(dict.fromkeys(out))


def slurm_job_to_requeue() -> str | None:
    """The job id ``scontrol requeue`` takes (``<array job>_<task>`` for an array task), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_job() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue $SLURM_JOB_ID``) when both exist; what happened, in words."""
    job = slurm_job_to_requeue()
    if job is None:
        return "not a SLURM job: not requeued (restart it with the same command; --ckpt_path auto resumes)"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"scontrol is not on PATH: SLURM job {job} not requeued (requeue it with scontrol requeue {job})"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol requeue {job} failed ({e}); requeue it by hand"
    if done.returncode != 0:
        return f"scontrol requeue {job} failed (exit {done.returncode}: {done.stderr.strip()[:200]}); requeue it by hand"
    return f"SLURM job {job} requeued"
