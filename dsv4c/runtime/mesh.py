"""Multi-device engines: one process per rank, the caller's executor protocol on top.

A multi-device artifact's manifest has `engine.mesh` ({"world", "tensor", "expert", "data", "devices_per_node",
"nodes", "backend", "ranks": ["rank0", ...]}) and one engine per rank under `engine/<ranks[r]>/`, each what a
single-device build of the target writes for that rank's shard. Every rank runs every step: the ranks' programs
exchange activations through collective nodes (AllReduce / AllGather, graphs/parallel.py), so a step needs all of
them. The logits come back from rank 0.

Two ways to run the ranks:

  * one host (`Engine.load(path)`, `dsv4c run`, `chat`, `serve`): `MeshExecutor` starts one worker process per rank
    (multiprocessing spawn), which joins a gloo process group on 127.0.0.1, loads its rank with the target's own
    `load_executor`, connects the collectives and serves commands over a pipe. The caller's process holds no
    rank: it waits on the pipes and on the workers' exit sentinels together, so a worker that dies (killed,
    crashed, failed to load) turns the call into an `EngineFailure` at once and the other workers are stopped.
  * several hosts (torchrun): every process is a rank; rank 0 drives, the others serve.

        torchrun --nnodes 2 --nproc-per-node 1 --node-rank N --master-addr HOST --master-port PORT \\
            -m dsv4c.compiler.cli mesh ARTIFACT run --tokens 5,6,7

    (`dsv4c mesh`, in the command line's module: the runtime never imports the compiler.) Ranks other than 0
    serve ARTIFACT until rank 0 closes it. Rank 0 runs the dsv4c command given after the artifact (`run`,
    `serve`, `chat`), whose `Engine.load` finds the initialised process group and drives the mesh:
    `TorchrunExecutor` broadcasts each command to the other ranks and runs rank 0's part itself. A Python program
    does the same under torchrun: `init_torchrun()`, then `Engine.load` on rank 0 and `serve(ARTIFACT)` on the
    others.

`threads` (Engine.load) is the total for this host, split evenly between its workers.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import socket
import sys
import weakref
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np

from dsv4c.artifact import ArtifactError, EngineFailure, Manifest, read_manifest
from dsv4c.targets.base import CacheSlot, cache_slots, check_host_arrays

# Bounds a collective or rendezvous that waits for a rank that never comes (gloo's timeout). A dead worker on this
# host is noticed through its exit sentinel long before; this is for a rank lost some other way (another host).
TIMEOUT_S = float(os.environ.get("DSV4C_MESH_TIMEOUT", "600"))
STOP_GRACE_S = 2.0  # how long a worker gets to exit after `close` / SIGTERM before it is killed
DEATH_GRACE_S = 1.0  # after a worker's error, how long to look for a dead peer that caused it


def mesh_layout(manifest: Manifest) -> dict[str, Any] | None:
    """The manifest's mesh section, or None for a single-device engine."""
    return manifest.engine.get("mesh")


def rank_manifest(root: Path, manifest: Manifest, rank: int) -> tuple[Path, Manifest]:
    """Rank `rank`'s engine directory and the manifest its target's executor reads: the artifact's, with the
    engine section of that rank's own `engine.json` (programs, kernels and format are the rank's)."""
    mesh = mesh_layout(manifest)
    ranks = mesh.get("ranks") or [f"rank{r}" for r in range(int(mesh["world"]))]
    engine_dir = root / "engine" / ranks[rank]
    info = engine_dir / "engine.json"
    if not info.is_file():
        raise ArtifactError(f"{info}: missing; the multi-device artifact is incomplete (rank {rank} of "
                            f"{mesh['world']}); rebuild it")
    engine = {**manifest.engine, **json.loads(info.read_text())}
    return engine_dir, Manifest({**manifest.data, "engine": engine})


class RankServer:
    """One rank's engine and its caches (by id), driven by commands every rank receives in the same order."""

    def __init__(self, root: Path, manifest: Manifest, rank: int, emulate: bool = False,
                 threads: int | None = None):
        engine_dir, mine = rank_manifest(root, manifest, rank)
        executors = importlib.import_module(f"dsv4c.targets.{manifest.target}.executor")
        self.executor = executors.load_executor(root, mine, emulate=emulate, threads=threads, engine_dir=engine_dir)
        if not hasattr(self.executor, "connect_collectives"):
            raise ArtifactError(f"{root}: the {manifest.target} executor cannot run a rank of a mesh in this dsv4c")
        self.executor.connect_collectives()
        self.caches: dict[int, Any] = {}

    def handle(self, op: str, args: tuple, free: Sequence[int] = ()) -> Any:
        for cid in free:
            self.caches.pop(cid, None)
        if op == "run":
            program, tokens, start_pos, n_valid, cid = args
            return self.executor.run(program, tokens, start_pos, n_valid, self.caches[cid])
        if op == "new_cache":
            cid, batch = args
            self.caches[cid] = self.executor.new_cache(batch)
        elif op == "reset":
            cid, slot = args
            self.caches[cid].reset(slot)
        elif op == "take":
            cid, slots, new = args
            self.caches[new] = self.caches[cid].take(slots)
        elif op == "put":
            cid, slots, part = args
            self.caches[cid].put(slots, self.caches[part])
        elif op == "to_host":
            return self.caches[args[0]].to_host()
        elif op == "from_host":
            cid, arrays = args
            self.caches[cid].from_host(arrays)
        elif op != "ping":
            raise ValueError(f"unknown mesh command {op!r}")
        return None


class MeshCache:
    """A cache handle of the mesh: the caches live in every rank's worker; this names them (see base.Cache)."""

    def __init__(self, mesh: "MeshExecutor | TorchrunExecutor", cid: int, slots: Sequence[CacheSlot],
                 batch_size: int):
        self.mesh, self.cid, self.slots, self.batch_size = mesh, cid, list(slots), batch_size
        weakref.finalize(self, mesh.release, cid)  # the workers drop it with the next command

    def reset(self, slot: int) -> None:
        self.mesh.call("reset", (self.cid, int(slot)))

    def take(self, slots: np.ndarray) -> "MeshCache":
        return self.mesh.new_handle(len(slots), lambda new: ("take", (self.cid, np.asarray(slots), new)))

    def put(self, slots: np.ndarray, part: "MeshCache") -> None:
        self.mesh.call("put", (self.cid, np.asarray(slots), part.cid))

    def to_host(self) -> list[np.ndarray]:
        return self.mesh.call("to_host", (self.cid,))  # rank 0's: every rank holds the same caches

    def from_host(self, arrays: Sequence[np.ndarray]) -> None:
        check_host_arrays(self.slots, self.batch_size, arrays)  # here: a wrong shape must not break the mesh
        self.mesh.call("from_host", (self.cid, [np.asarray(a) for a in arrays]))


class MeshBase:
    """What both drivers share: cache ids, the executor protocol over `call`."""

    slots: list[CacheSlot]

    def __init__(self) -> None:
        self._ids = itertools.count()
        self._free: list[int] = []

    def call(self, op: str, args: tuple) -> Any:
        raise NotImplementedError

    def release(self, cid: int) -> None:
        self._free.append(cid)

    def take_free(self) -> list[int]:
        free, self._free = self._free, []
        return free

    def new_handle(self, batch_size: int, command) -> MeshCache:
        cid = next(self._ids)
        op, args = command(cid)
        self.call(op, args)
        return MeshCache(self, cid, self.slots, batch_size)

    def new_cache(self, batch_size: int) -> MeshCache:
        return self.new_handle(batch_size, lambda cid: ("new_cache", (cid, int(batch_size))))

    def run(self, program: str, tokens: np.ndarray, start_pos: np.ndarray, n_valid: np.ndarray,
            cache: MeshCache) -> np.ndarray:
        return self.call("run", (program, tokens, start_pos, n_valid, cache.cid))


# ---- one host: worker processes ------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; the rendezvous binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(root: str, rank: int, port: int, threads: int | None, emulate: bool, conn: Connection) -> None:
    """A rank's process: join the group, load the rank, then serve the driver's commands until `close` or until
    the driver is gone (its pipe closes)."""
    try:
        import torch
        import torch.distributed as dist

        from dsv4c.graphs import parallel

        if threads:
            torch.set_num_threads(threads)  # the collectives' copies: stay within this worker's share of the cores
        if importlib.util.find_spec("onnxruntime") is not None:
            import onnxruntime

            # a failed run is reported to the driver, which raises it once: ORT's own log line (on the terminal
            # the workers share with the caller) would only repeat it, in the middle of a command's output
            onnxruntime.set_default_logger_severity(4)
        manifest = read_manifest(root)
        mesh = mesh_layout(manifest)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=int(mesh["world"]), timeout=timedelta(seconds=TIMEOUT_S))
        parallel.setup(parallel.Shard(rank, int(mesh["tensor"]), int(mesh["expert"]), int(mesh["data"])))
        server = RankServer(Path(root), manifest, rank, emulate=emulate, threads=threads)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
        conn.send(("error", f"rank {rank} failed to load: {type(e).__name__}: {e}"))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            op, args, free = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if op == "close":
            return
        try:
            result = server.handle(op, args, free)
            conn.send(("ok", result if rank == 0 else None))  # only rank 0's answer is used
        except BaseException as e:  # noqa: BLE001 - reported to the driver
            conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}"))


class MeshExecutor(MeshBase):
    """The ranks of a one-host mesh, each in its own worker process; the executor protocol of targets/base.py."""

    def __init__(self, root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None):
        super().__init__()
        mesh = mesh_layout(manifest)
        self.world = int(mesh["world"])
        self.slots = cache_slots(manifest.engine)
        per_worker = max(1, (threads or os.cpu_count() or 1) // self.world)
        port = free_port()
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's and ORT's threads' locks
        self.procs, self.conns = [], []
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(str(root), rank, port, per_worker, emulate, child),
                            name=f"dsv4c-mesh-rank{rank}", daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        # stops the workers when this executor is collected or the interpreter exits (daemon processes are
        # terminated then too; this asks them to close first)
        self._finalizer = weakref.finalize(self, stop_workers, self.procs, self.conns)
        try:
            self.pids = self._gather("load", loading=True)
        except EngineFailure as e:
            raise ArtifactError(f"{root}: the mesh did not start: {e}") from None

    def call(self, op: str, args: tuple) -> Any:
        if not self._finalizer.alive:
            raise EngineFailure("the mesh engine is closed (Engine.close, or a worker failed earlier); load the "
                                "artifact again")
        message = (op, args, self.take_free())
        for rank, conn in enumerate(self.conns):
            try:
                conn.send(message)
            except (BrokenPipeError, OSError):
                break  # its exit sentinel says which rank and how; _gather reports it
        return self._gather(op)[0]

    def _gather(self, op: str, loading: bool = False) -> list[Any]:
        """Every rank's answer, in rank order. A worker that exits or fails stops the whole mesh: the others may
        be waiting in a collective for it, and their caches no longer agree."""
        results: dict[int, Any] = {}
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs)}
        while len(results) < self.world:
            waiting = {id(c): r for r, c in enumerate(self.conns) if r not in results}
            ready = wait([self.conns[r] for r in waiting.values()] + list(sentinels))
            # answers first: a worker that failed to load sends its reason, then exits
            for conn in (c for c in ready if not isinstance(c, int)):
                rank = waiting[id(conn)]
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    continue  # it died: its sentinel says how
                if status == "error":
                    # a peer that died makes the others' collectives fail first: name the dead one, the cause
                    # (a worker that reports an error exits with 0 after it: only a crash or a kill is a cause)
                    others = [sent for sent, r in sentinels.items() if r != rank]
                    for sent in wait(others, timeout=DEATH_GRACE_S):
                        self.procs[sentinels[sent]].join(0.1)
                        if self.procs[sentinels[sent]].exitcode not in (0, None):
                            self._died(sentinels[sent], op)
                    self._finalizer()
                    raise EngineFailure(value if loading else f"{value} (during {op}; the mesh was stopped)")
                results[rank] = value
            for sentinel in (s for s in ready if isinstance(s, int)):
                rank = sentinels[sentinel]
                if self.conns[rank].poll():
                    continue  # its last message is still unread: the next round reads it
                self._died(rank, op)
        return [results[r] for r in range(self.world)]

    def _died(self, rank: int, op: str) -> NoReturn:
        self._finalizer()
        raise EngineFailure(f"mesh worker rank {rank} (pid {self.procs[rank].pid}) "
                            f"{describe_exit(self.procs[rank].exitcode)} during {op}; the other "
                            f"{self.world - 1} worker(s) were stopped")

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        import signal

        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def stop_workers(procs: Sequence[multiprocessing.Process], conns: Sequence[Connection]) -> None:
    """Ask each worker to close, then terminate, then kill whatever is still running."""
    for conn in conns:
        try:
            conn.send(("close", (), []))
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        p.join(STOP_GRACE_S / 2)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(STOP_GRACE_S / 2)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()


# ---- several hosts: torchrun, rank 0 drives -------------------------------------------------------------------
DRIVERS: "weakref.WeakSet[TorchrunExecutor]" = weakref.WeakSet()  # this process's live torchrun drivers


class TorchrunExecutor(MeshBase):
    """Rank 0 of a torchrun-launched mesh: each command is broadcast to the other ranks (which run `serve`) over
    the default process group, then run here on rank 0's own engine."""

    def __init__(self, root: Path, manifest: Manifest, emulate: bool = False, threads: int | None = None):
        import torch.distributed as dist

        super().__init__()
        self.slots = cache_slots(manifest.engine)
        self.world = dist.get_world_size()
        self.server = RankServer(root, manifest, 0, emulate=emulate, threads=threads)
        # tells the other ranks to stop, once: on close, when collected, at interpreter exit, at shutdown_torchrun
        self._finalizer = weakref.finalize(self, broadcast_close)
        DRIVERS.add(self)

    def call(self, op: str, args: tuple) -> Any:
        import torch.distributed as dist

        if not self._finalizer.alive:
            raise EngineFailure("the mesh engine is closed (Engine.close); load the artifact again")
        message = (op, args, self.take_free())
        try:
            dist.broadcast_object_list([message], src=0)
            return self.server.handle(*message)
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            self._finalizer.detach()  # nobody left to tell
            raise EngineFailure(f"the mesh failed during {op} (did a rank on another host stop?): {e}") from None

    def close(self) -> None:
        self._finalizer()


def broadcast_close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.broadcast_object_list([("close", (), [])], src=0)
        except RuntimeError:  # the others are gone already: nothing to tell
            pass


def serve(path: str | Path, emulate: bool = False, threads: int | None = None) -> None:
    """Serve this process's rank (torch.distributed already initialised, rank != 0) until rank 0 closes the mesh."""
    import torch.distributed as dist

    root = Path(path)
    manifest = read_manifest(root)
    setup_torchrun_rank(manifest)
    server = RankServer(root, manifest, dist.get_rank(), emulate=emulate, threads=threads)
    while True:
        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:  # gloo: rank 0's connection closed, or the timeout passed
            raise EngineFailure(f"rank {dist.get_rank()}: lost rank 0, the driver of the mesh: {e}") from None
        op, args, free = box[0]
        if op == "close":
            return
        server.handle(op, args, free)


def setup_torchrun_rank(manifest: Manifest) -> None:
    """Check the process group against the artifact's mesh and create the rank's groups (once per process)."""
    import torch.distributed as dist

    from dsv4c.graphs import parallel

    mesh = mesh_layout(manifest)
    world = int(mesh["world"])
    if dist.get_world_size() != world:
        raise ArtifactError(f"the artifact's mesh has {world} ranks, torchrun started {dist.get_world_size()} "
                            f"(give --nnodes x --nproc-per-node = {world})")
    shard = parallel.Shard(dist.get_rank(), int(mesh["tensor"]), int(mesh["expert"]), int(mesh["data"]))
    parallel.setup(shard)


def load_mesh_executor(root: Path, manifest: Manifest, emulate: bool = False,
                       threads: int | None = None) -> MeshBase:
    """Engine.load's hook for a multi-device artifact: inside an initialised torch.distributed world (torchrun)
    this process is rank 0 and drives; otherwise the ranks start here, one worker process each."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if dist.get_rank() != 0:
                raise ArtifactError(f"rank {dist.get_rank()} of a torchrun mesh serves (dsv4c.runtime.mesh.serve); "
                                    "only rank 0 loads the engine")
            setup_torchrun_rank(manifest)
            return TorchrunExecutor(root, manifest, emulate=emulate, threads=threads)
    mesh = mesh_layout(manifest)
    if int(mesh.get("nodes", 1)) > 1:
        raise ArtifactError(f"{root}: a {mesh['nodes']}-node mesh; start it with torchrun on every node "
                            "(`dsv4c mesh`, see the README's multi-device section)")
    return MeshExecutor(root, manifest, emulate=emulate, threads=threads)


def init_torchrun() -> int:
    """Join the process group torchrun's environment describes (env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE); returns this process's rank."""
    import torch.distributed as dist

    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise ArtifactError(f"not started by torchrun ({', '.join(missing)} unset): a multi-node mesh runs as "
                            "`torchrun ... -m dsv4c.compiler.cli mesh ARTIFACT COMMAND`")
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    return dist.get_rank()


def shutdown_torchrun() -> None:
    """Leave the process group, after the driver's finalizer (if any) has told the other ranks to stop."""
    import gc

    import torch.distributed as dist

    gc.collect()  # an engine no longer referenced closes its mesh now, while the group still exists
    for driver in list(DRIVERS):  # one still referenced (a traceback, a global) closes too: the group goes away
        driver.close()
    if dist.is_initialized():
        dist.destroy_process_group()
