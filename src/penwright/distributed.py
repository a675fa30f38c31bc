"""Training on several processes with torch.distributed, as torchrun (or SLURM through torchrun) starts them.

torchrun gives each process RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins the process group
(nccl on GPUs, gloo on CPU). Every rank runs the same loop on its own slice of each global
batch (`batches.Blocks`). DDP averages gradients across ranks; `--fsdp` (FSDP2 `fully_shard`)
also shards parameters, gradients and optimizer state. Rank 0 alone prints, logs, samples and
writes files.

Checkpoints hold full (unsharded) weights and a full optimizer state keyed by parameter name,
so a run resumes on any number of processes, with or without FSDP, and exports as plain HF.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PenwrightError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group, if this process was started by one; one GPU per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PenwrightError(f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this machine but "
                                 f"only {torch.cuda.device_count()} GPUs: start one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def peer_failed(error: BaseException) -> bool:
    """True when `error` is a collective failing because another process died or left (gloo and
    nccl say so with a DistError, or a RuntimeError about the closed connection)."""
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(s in str(error) for s in signs)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(value, ranks: Ranks):
    """Rank 0's `value` (any picklable object) on every rank."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first(ranks: Ranks):
    """Rank 0 runs the block first (claiming the run dir, filling the token cache), then the others.

    If it fails there, the others leave quietly with exit code 2; rank 0 says what went wrong.
    """
    if ranks.main:
        try:
            yield
        except BaseException:
            share(False, ranks)
            raise
        share(True, ranks)
    else:
        if not share(None, ranks):
            raise SystemExit(2)
        yield


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device, fsdp: bool) -> torch.nn.Module:
    """`model` moved to `device`, and the module the training step runs: `model` itself, DDP around it,
    or `model` sharded in place by FSDP2, which moves each block as it shards it, so that the whole
    model never has to fit on one GPU."""
    if not (fsdp and ranks.world > 1):
        model.to(device)
    if ranks.world == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ranks.world,))
        # One shard group per transformer block (HF names their class in _no_split_modules), then
        # the rest (embeddings, tied head, final norm) at the root: each block is gathered in turn.
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        for module in [m for m in model.modules() if type(m).__name__ in blocks]:
            fully_shard(module, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(net: torch.nn.Module, now: bool):
    """Gradient accumulation: average gradients across ranks only on the last micro-step."""
    if now:
        return nullcontext()
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2 keeps unsharded gradients until the last one
        return _fsdp_no_sync(net)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def plain(value: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor for a DTensor (under FSDP, the gradient norm is one, replicated on every rank)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def mean(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of `value` over all ranks (gloo has no AVG, so SUM / world)."""
    if ranks.world == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world


def agree(reason: str | None, ranks: Ranks, device: torch.device) -> str | None:
    """Stop on every rank when any rank was asked to stop (say, by a SIGTERM only it received)."""
    if ranks.world == 1:
        return reason
    flag = torch.tensor(float(reason is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return reason or ("a signal to another rank" if flag.item() else None)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
               fsdp: bool) -> tuple[dict | None, dict | None]:
    """Full weights (under FSDP; None means "the model's own") and the full optimizer state (None
    without an optimizer: --no-save-optimizer), on rank 0.

    Every rank must call this: under FSDP it gathers the shards. The optimizer state is keyed by
    parameter name, not position, which is what lets `load_optimizer` reshard it for any world size.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return full_weights(model, fsdp), (None if optimizer is None
                                      else get_optimizer_state_dict(model, optimizer, options=options))


def full_weights(model: torch.nn.Module, fsdp: bool) -> dict | None:
    """Under FSDP the full weights, gathered onto rank 0's CPU (every rank must call this); else None,
    meaning "the model's own"."""
    if not (fsdp and dist.is_initialized()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state written by `full_state`, sharding it if the model is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def launch(nproc: int, argv: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node NPROC -m penwright ARGV`: one machine, NPROC processes.

    Returns the exit code of the first process that failed (its own message is already printed).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Share the cores instead of torchrun's default of one thread per process (and its warning).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the workers say what went wrong
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "penwright", *argv])
    try:
        run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # negative: killed by a signal
    except SignalException:  # Ctrl+C or SIGTERM: forwarded once to every worker, which saved and stopped
        return 130
    return 0
