"""``famtune train --nproc N``: start the run as N worker processes per node through torchrun.

famtune's launcher is torchrun (``torch.distributed.run``), called through its API in this
process, which becomes torchrun's elastic agent: it starts the workers (``python -m famtune.cli
train ...``), watches them, stops all of them as soon as one fails, and with ``--max-restarts K``
starts them again up to K times (they then resume from the last complete checkpoint). Starting
famtune under ``torchrun`` or ``accelerate launch`` yourself works the same way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from famtune.errors import FamtuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launch options of ``famtune train``."""
    g = parser.add_argument_group("several processes (torchrun; see docs/users/distributed.md)")
    g.add_argument("--nproc", type=int, metavar="N", help="worker processes on this node (one per GPU; on CPU, gloo)")
    g.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes (default 1)")
    g.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank, 0..M-1 (default 0)")
    g.add_argument("--master", metavar="ADDR:PORT", help="address of node 0's rendezvous (required when M > 1)")
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="restart all workers up to K times after a failure, resuming from the last checkpoint",
    )


@dataclass(frozen=True)
class LaunchOptions:
    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None
    max_restarts: int = 0

    @classmethod
    def from_args(cls, args) -> LaunchOptions | None:
        """The options given on the command line, or None when the run is a single process."""
        given = args.nproc is not None or args.nnodes != 1 or args.master is not None or args.max_restarts
        if not given:
            return None
        opts = cls(
            args.nproc if args.nproc is not None else 1, args.nnodes, args.node_rank, args.master, args.max_restarts
        )
        opts.check()
        return opts

    def check(self) -> None:
        from famtune.distributed import launched_worker

        if launched_worker():
            raise FamtuneError(
                "this famtune was itself started by a launcher (torchrun/accelerate launch); "
                "drop --nproc/--nnodes/--master/--max-restarts or the outer launcher"
            )
        if self.nproc < 1:
            raise FamtuneError(f"--nproc {self.nproc}: expected at least 1 process")
        if self.nnodes < 1:
            raise FamtuneError(f"--nnodes {self.nnodes}: expected at least 1 node")
        if not 0 <= self.node_rank < self.nnodes:
            raise FamtuneError(
                f"--node-rank {self.node_rank}: expected 0..{self.nnodes - 1} for --nnodes {self.nnodes}"
            )
        if self.max_restarts < 0:
            raise FamtuneError(f"--max-restarts {self.max_restarts}: expected 0 or more")
        if self.nnodes > 1 and not self.master:
            raise FamtuneError(
                f"--nnodes {self.nnodes} needs --master ADDR:PORT, the address of node 0 "
                "that every node can reach (the same on all nodes)"
            )
        if self.master is not None:
            self.master_address()

    def master_address(self) -> tuple[str, int]:
        host, _, port = (self.master or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise FamtuneError(f"--master {self.master!r}: expected ADDR:PORT, e.g. 10.0.0.1:29500")
        return host, int(port)

    def torchrun_args(self, worker_args: list[str]) -> list[str]:
        """torchrun's command line for the workers ``python -m famtune.cli WORKER_ARGS``."""
        args = [
            "--nproc-per-node",
            str(self.nproc),
            "--nnodes",
            str(self.nnodes),
            "--max-restarts",
            str(self.max_restarts),
            "--monitor-interval",
            "0.5",
        ]
        if self.master is None:
            # One node, a free port chosen by torchrun's c10d rendezvous: runs never collide.
            args.append("--standalone")
        else:
            # Static rendezvous: node ranks are the ones given, so global rank 0 (which writes the
            # checkpoints and the adapter) is always on node 0.
            host, port = self.master_address()
            args += ["--node-rank", str(self.node_rank), "--master-addr", host, "--master-port", str(port)]
        return args + ["--module", "famtune.cli", *worker_args]


def worker_args(args, extra: list[str]) -> list[str]:
    """The ``famtune train`` arguments each worker runs with: the same recipe, overrides and resume."""
    out = ["train", args.recipe, *extra]
    if args.resume:
        out.append(f"--resume={args.resume}")
    if getattr(args, "overwrite", False):
        out.append("--overwrite")
    return out


def launch(opts: LaunchOptions, worker: list[str], output_dir: str) -> int:
    """Run the workers through torchrun; a failure becomes one line naming the rank and what to do."""
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Workers share the node's cores: one thread each unless the user chose otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Workers get a fresh store per attempt instead of sharing the rendezvous store, where the keys
    # of a failed attempt make the restarted workers' process-group set-up wait forever
    # (pytorch/pytorch#135712; seen here as a hang after --max-restarts restarted them).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    argv = opts.torchrun_args(worker)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=_root_cause_first)
        rank, failure = failures[0]
        then = "".join(f", then rank {r} ({_how(f)})" for r, f in failures[1:])
        again = f" --nproc {opts.nproc}" + (f" --nnodes {opts.nnodes} ..." if opts.nnodes > 1 else "")
        tried = f" after {opts.max_restarts} restart(s)" if opts.max_restarts else ""
        raise FamtuneError(
            f"worker rank {rank} failed ({_how(failure)}){then}{tried}; all workers were stopped. Checkpoints "
            f"are in {output_dir}/checkpoints; continue with: famtune train RECIPE{again} "
            "--resume"
        ) from None
    except Exception as exc:  # rendezvous and agent errors
        if exc.__class__.__module__.startswith("torch.distributed"):
            raise FamtuneError(f"torchrun could not run the workers: {exc.__class__.__name__}: {exc}") from None
        raise
    return 0


def _how(failure) -> str:
    return f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"


def _root_cause_first(item) -> tuple:
    """A worker killed by a signal torchrun does not send (SIGTERM is how it stops the others) is
    the cause; the others' exits (a collective that lost its peer) follow from it."""
    import signal

    rank, failure = item
    killed = failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM
    return (not killed, failure.timestamp, rank)
