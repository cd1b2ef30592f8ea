"""Process-group start-up: from torchrun's environment or as a lone process, nccl on GPU, gloo on CPU."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from steerlm import megatron_compat
from steerlm.config.schema import Backend, ParallelConfig
from steerlm.config.validation import Accelerator, data_parallel_size
from steerlm.runtime import cpu_matmul, mkl
from steerlm.runtime.layout import ParallelLayout
from steerlm.runtime.lifetime import die_with_parent, started_by_torchrun

log = logging.getLogger(__name__)


def detect_accelerator() -> Accelerator:
    return Accelerator.cuda if torch.cuda.is_available() else Accelerator.cpu


def launch_world_size() -> int:
    """World size this process was launched with (torchrun's WORLD_SIZE, else 1)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_started = 0  # default process groups this process has started (every rank starts as many, in the same order)


def _init_process_group(parallel: ParallelConfig, accelerator: Accelerator) -> str:
    """Start the default process group unless one is running. A recipe with several phases (the bootstrap:
    sample, label, fine-tune) starts one per phase: under torchrun the rendezvous store is the launcher's and
    outlives each group, and a group started again under the same keys would read the last one's addresses and
    wait forever, so every start after the first gets keys of its own."""
    global _started
    backend = parallel.distributed_backend.value
    if parallel.distributed_backend == Backend.auto:
        backend = "nccl" if accelerator == Accelerator.cuda else "gloo"
    timeout = timedelta(minutes=parallel.distributed_timeout_minutes)
    if dist.is_initialized():
        return dist.get_backend()
    _started += 1
    if "RANK" in os.environ and _started == 1:  # torchrun / srun with the env:// rendezvous
        dist.init_process_group(backend=backend, timeout=timeout)
    elif "RANK" in os.environ:
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"steerlm_start_{_started}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:  # a lone `python recipe.py`: a world of one
        dist.init_process_group(
            backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )
    return backend


def initialize(parallel: ParallelConfig, seed: int) -> ParallelLayout:
    """Start distributed, build megatron's parallel groups once and seed; returns the layout.

    Safe to call again after `shutdown()` (tests re-initialise with other layouts in one process).
    """
    if started_by_torchrun():  # its workers outlive an agent killed with -9 otherwise (steerlm.runtime.lifetime)
        die_with_parent()
    accelerator = detect_accelerator()
    # megatron's tensor-parallel overlap of grad all-reduce with compute assumes one CUDA work queue.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if accelerator == Accelerator.cpu:
        reproducibility = mkl.request(parallel.cpu_reproducible)  # before any product: MKL reads it once
        megatron_compat.activate()
        onednn = cpu_matmul.install(parallel.cpu_matmul)
        log.info(
            "megatron's fp32 linear products on this CPU: %s (parallel.cpu_matmul=%s); %s",
            "oneDNN" if onednn else "torch's BLAS",
            parallel.cpu_matmul.value,
            reproducibility,
        )
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = _init_process_group(parallel, accelerator)
    world_size = dist.get_world_size()
    dp = data_parallel_size(parallel, world_size)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
        create_gloo_process_groups=False,
    )
    seed_everything(seed, cuda_rng_tracker=accelerator == Accelerator.cuda)
    layout = ParallelLayout(
        world_size=world_size,
        rank=dist.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp=parallel.tensor_model_parallel_size,
        pp=parallel.pipeline_model_parallel_size,
        dp=dp,
        cp=parallel.context_parallel_size,
        vpp=parallel.virtual_pipeline_model_parallel_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        device=device,
        backend=backend,
        sequence_parallel=parallel.sequence_parallel,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    log.info("parallel layout: %s", layout.describe())
    return layout


def seed_everything(seed: int, cuda_rng_tracker: bool) -> None:
    """Same default-RNG seed on every rank; megatron's per-TP-rank CUDA RNG streams on GPU.

    Parameter initialisation does not depend on these streams (see `steerlm.models.init`), so
    layouts agree on the initial weights. Without CUDA there are no device RNG streams to track, so
    megatron's tracker is made a pass-through (its `fork()` becomes a no-op).
    """
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not cuda_rng_tracker, force_reset_rng=True)


def shutdown(destroy_process_group: bool = True) -> None:
    """Tear down megatron's groups and, unless told to keep it, the default process group.

    Keeping the default group lets one launch run several layouts in turn (parity tests).
    """
    parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def inference() -> Iterator[None]:
    """Forward passes that never train (generation, scoring): `torch.inference_mode`, and whatever the
    runtime installed for training that inference does not need lifted for speed."""
    with torch.inference_mode(), megatron_compat.lifted():
        yield


@contextlib.contextmanager
def worker_thread(layout: ParallelLayout) -> Iterator[None]:
    """Run this thread as `initialize` set up its own: the current CUDA device and, without CUDA, the CPU
    stand-ins are per thread (a serving engine drives the model from a thread of its own)."""
    if layout.device.type == "cuda":
        torch.cuda.set_device(layout.device)
    with megatron_compat.thread_mode():
        yield
