"""Feature extraction split over devices: ``zoo probe ... --devices N [--num_nodes M]`` (fast and kNN modes).

Each of the ``N x M`` ranks extracts its share of a split's shards once (shard ``i`` on rank ``i % world``) into the
one memory-mapped store (``zoo.eval.store``), so nothing is gathered: the rows land at their dataset positions and
labels, order and skipped files are those of one device. On one node the probe starts the ranks itself (spawned
processes joined in a process group: NCCL on GPUs, gloo on CPUs); over several nodes every process is started by the
scheduler or ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``; the store on a shared file system), extracts its
share, waits for the others, and then every rank trains the same heads on the same features (rank 0 writes).

A *device* is a GPU (at most ``torch.cuda.device_count()``) or, on a CPU-only machine, one process with its share of
the CPUs this process may use (at most ``cpu_count()`` of them: the affinity mask, a container's or taskset's share),
each running ``cpu_count() // N`` threads.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["rank_error", "cpu_count", "check_devices", "available_devices", "launched_rank", "extract_split",
           "is_main_process"]


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def available_devices(device: torch.device) -> tuple[int, str]:
    """(devices this machine has for ``device``'s type, what they are, in words)."""
    if device.type == "cuda":
        return torch.cuda.device_count(), "GPUs (torch.cuda.device_count())"
    return cpu_count(), "CPUs this process may use (a CPU device is one process)"


def check_devices(devices: int, num_nodes: int, device: torch.device) -> None:
    """Refuse, in one line, a device count this machine does not have, or a launch that contradicts the flags."""
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"--devices {devices} --num_nodes {num_nodes}: both must be >= 1")
    have, what = available_devices(device)
    if devices > have:
        raise ValueError(f"--devices {devices}: this machine has {have} {what}; pass --devices {have} or fewer")
    world = launched_rank()
    if num_nodes > 1 and world is None:
        raise ValueError(f"--num_nodes {num_nodes}: start one process per device on every node with torchrun or srun "
                         "(RANK / WORLD_SIZE / MASTER_ADDR set); on one node leave --num_nodes out")
    if world is not None and world[1] != devices * num_nodes:
        raise ValueError(f"the launcher started {world[1]} processes (WORLD_SIZE) but --devices {devices} x "
                         f"--num_nodes {num_nodes} = {devices * num_nodes}: make them agree")


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when a launcher started this process as one of several, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    return int(os.environ["RANK"]), world


def is_main_process() -> bool:
    """Whether this process is rank 0, the one that prints, claims ``--out`` and writes the probe's files.

    Asked of the process group once there is one; before that of the launcher's variables, read only when a launch
    is really under way (``WORLD_SIZE`` > 1 with ``MASTER_ADDR``, or ``SLURM_NTASKS`` > 1), so a stray ``RANK`` or
    ``LOCAL_RANK`` in a one-process run changes nothing: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun tasks), or, for
    the processes Lightning starts itself for ``--devices N`` (it re-runs the command with only ``LOCAL_RANK`` /
    ``NODE_RANK`` set), both of those. A rank that is not 0 must never claim or clear ``--out``: ``--overwrite``
    there would delete the files rank 0 is writing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env and "RANK" not in env:
        return env["SLURM_PROCID"] in ("", "0")
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or "MASTER_ADDR" not in env:
        return True
    if "RANK" in env:
        return env["RANK"] in ("", "0")
    return env.get("LOCAL_RANK", "0") in ("", "0") and env.get("NODE_RANK", "0") in ("", "0")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _extract_share(rank: int, world: int, job: dict[str, Any]) -> None:
    """This rank's shards of the store, then a barrier (every rank's shards are on disk when it returns)."""
    import torch.distributed as dist

    from zoo.eval.features import IndexedDataset, extract_to_store
    from zoo.eval.store import FeatureStore

    device = torch.device(job["device"])
    local = int(os.environ.get("LOCAL_RANK", rank % max(job["devices"], 1)))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    store = FeatureStore(job["root"], job["key"], job["n"], job["dtype"], job["shard_rows"])

    def make_loader(subset: Dataset) -> DataLoader:
        return DataLoader(IndexedDataset(subset), batch_size=job["batch_size"], shuffle=False, num_workers=job["num_workers"],
                          collate_fn=job["collate"])

    extract_to_store(job["encoder"].to(device), job["dataset"], make_loader, job["prepare"], device, store,
                     f"{job['desc']} (rank {rank}/{world})", job["progress"] and rank == 0, job["autocast"], rank, world)
    dist.barrier()


def _spawned(rank: int, world: int, port: int, job: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(job["threads"])
    dist.init_process_group(_backend(torch.device(job["device"])), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        _extract_share(rank, world, job)
    finally:
        dist.destroy_process_group()


def extract_split(job: dict[str, Any], devices: int) -> None:
    """Extract the store ``job`` names on ``devices`` ranks of this node (spawned here), or on this launched rank.

    ``job``: encoder, dataset, prepare, collate, device, root / key / n / dtype / shard_rows of
    a store already created, batch_size, num_workers (per rank), autocast, desc, progress, devices."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    launched = launched_rank()
    if launched is not None:
        if not dist.is_initialized():
            dist.init_process_group(_backend(torch.device(job["device"])), init_method="env://")
        _extract_share(launched[0], launched[1], job)
        return
    job = {**job, "threads": max(1, cpu_count() // devices)}
    ranks = mp.spawn(_spawned, args=(devices, _free_port(), job), nprocs=devices, join=False)
    try:
        with _ranks_stop_with_this_process(ranks.processes):
            while not ranks.join():
                pass
    except mp.ProcessRaisedException as err:
        raise rank_error(err, devices) from None


@contextlib.contextmanager
def _ranks_stop_with_this_process(processes: list) -> Iterator[None]:
    """SIGTERM / SIGUSR1 / SIGHUP to this process (``kill PID``, a scheduler that signals only the job's first
    process) stops the spawned ranks too, then exits 128 + signal: no orphan keeps extracting, or writing into a store
    that a rerun resumes. Finished shards are kept (each is flushed before its record is written). Outside the main
    thread, where no handler can be set, the ranks are left to finish."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for proc in processes:
            if proc.is_alive():
                proc.terminate()
        for proc in processes:
            proc.join(10)
        print(f"probe: stopped by {signal.Signals(signum).name} during feature extraction; the finished shards are "
              "kept: rerun the same command to resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGHUP") if hasattr(signal, name)]
    before = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def rank_error(err: Exception, devices: int) -> Exception:
    """A spawned rank's user error (a full disk, a vanished file, a bad value: ``OSError`` / ``ValueError``) as that
    error in one line naming the rank, as the one-process path gives it; anything else (a bug) keeps the rank's
    traceback."""
    import builtins

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    found = re.match(r"(\w+): (.*)", lines[-1]) if lines else None
    kind = getattr(builtins, found.group(1), None) if found else None
    if isinstance(kind, type) and issubclass(kind, (OSError, ValueError)):
        rank = getattr(err, "error_index", "?")
        return kind(f"feature extraction, rank {rank} of {devices}: {found.group(2)}")
    return err
