"""The Ray Train loop of every learning stage (correspondence training, CMAT pretraining, CAST
fine-tuning): one loop, a `StepTask` says what a step and a validation are.

Every rank reads the whole plan in step order (training.trainer) and trains the rows of its slot;
the learning rate follows a linear warm-up and a cosine decay, set from the step (so a resume
needs no scheduler state); the losses are averaged over the ranks for the log; at every
`checkpoint_every` steps and at the end, rank 0 validates, writes the metric log and
TensorBoard, reports a checkpoint (weights, optimiser, step, RNG) and exports the best
validation weights to `best/`; every rank reports (a report is a barrier; only rank 0 attaches
the checkpoint). Resume: Ray restores nothing by itself; the loop loads model, optimiser, step
and RNG from `ray.train.get_checkpoint()`, skips the plan rows of the steps done (every rank the
same count) and truncates the metric log to the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from operators.store.storage import RunRoot
from training.runs import (BEST_DIR, META_FILE, STATE_FILE, WEIGHTS_FILE, MetricLog, read_state,
                           state_bytes, weights_bytes)


def _save_checkpoint(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     step: int, metrics: dict[str, Any]) -> None:
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(weights_bytes(model))
    with open(os.path.join(folder, STATE_FILE), "wb") as f:
        f.write(state_bytes(optimizer, step))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"step": step, **metrics}, f)


def mean_over_ranks(losses: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """The step's losses averaged over the ranks (what the log and TensorBoard show): each rank
    computes them on its own pairs."""
    names = sorted(losses)
    values = torch.stack([losses[k].detach().float() for k in names])
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(values)
        values = values / world_size
    return {k: float(v) for k, v in zip(names, values.cpu())}


class Progress:
    """Rank 0's progress lines (Ray forwards a worker's stdout to the driver): at most one
    every `every_s` seconds, with the rate of the steps trained in this process."""

    def __init__(self, steps: int, start_step: int, every_s: float = 15.0,
                 stage: str = "train") -> None:
        self.steps, self.start, self.every_s, self.stage = steps, start_step, every_s, stage
        self.tic = self.last = time.perf_counter()

    def say(self, line: str) -> None:
        # Not print(): Ray Train patches it to log and echo, which shows each line twice.
        sys.__stdout__.write(f"{self.stage}: {line}\n")
        sys.__stdout__.flush()

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s or step == self.steps:
            rate = (step - self.start) / max(now - self.tic, 1e-9)
            left = (self.steps - step) / max(rate, 1e-9)
            self.say(f"step {step}/{self.steps}, loss {loss:.4f}, {rate:.2f} steps/s, "
                     f"~{left:.0f} s left")
            self.last = now


def _peak_rss_mb() -> float:
    """Peak resident memory of this worker process so far (Linux reports KiB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def weights_spread(model: nn.Module, world_size: int) -> float:
    """max - min over the ranks of a float64 checksum of the weights (0 when DDP keeps them in
    sync, as it must; a desync stops the run rather than train diverging models)."""
    if world_size == 1:
        return 0.0
    import torch.distributed as dist
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    values = torch.stack(gathered)
    spread = float(values.max() - values.min())
    if spread > 1e-9 * max(1.0, float(values.abs().max())):
        raise RuntimeError(f"DDP ranks hold different weights (checksums {values.tolist()})")
    return spread


def _tensorboard():
    from tensorboardX import SummaryWriter
    return SummaryWriter(tempfile.mkdtemp(prefix="partlift-tb-"), flush_secs=3600)


def _close_tensorboard(writer) -> None:
    """Close the writer and remove its local folder (its files were uploaded under the run)."""
    import shutil
    writer.close()
    shutil.rmtree(writer.logdir, ignore_errors=True)


def _upload_tensorboard(writer, root: RunRoot, run: str) -> None:
    """Event files are written locally and copied under the run at each checkpoint (works the
    same for local and S3 roots)."""
    writer.flush()
    folder = writer.logdir
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            root.write_bytes(f"{run}/tensorboard/{name}", f.read())


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (drop-path, random draws in a step): set before
    every step, so that ranks draw differently and a resume - on CPU or GPU, whose RNG states
    a checkpoint does not hold - draws exactly what the interrupted run would have."""
    return (seed * 1_000_003 + step * 1_009 + rank) % (2 ** 63)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based): linear
    warm-up over `warmup` steps to 1, then a cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepTask:
    """What one kind of run trains (subclasses are pickled to every rank)."""

    stage = "train"                  # prefix of the progress lines
    metric = "val"                   # the validation metric (a key of validate()'s result)
    higher_is_better = True

    def __init__(self, root: RunRoot, run: str, cfg: dict[str, Any]) -> None:
        self.root, self.run, self.cfg = root, run, cfg

    def build(self) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Parameter groups, each with its peak "lr" (the schedule scales every group)."""
        return [{"params": list(model.parameters()), "lr": self.cfg["lr"]}]

    def schedule(self, step: int) -> float:
        """The learning-rate multiplier of optimizer step `step` (0-based): warm-up + cosine."""
        return lr_factor(step, self.cfg["steps"], self.cfg["warmup_steps"])

    def find_unused(self) -> bool:
        """Whether DDP must look for parameters a step leaves unused."""
        return False

    def start(self, device: torch.device) -> None:
        """Open readers on the worker (after unpickling)."""

    def step_module(self, model: nn.Module) -> nn.Module:
        """The module a step runs under DDP (its forward returns the losses)."""
        return model

    def batch(self, row: dict[str, Any], rank: int, device: torch.device) -> Any:
        raise NotImplementedError

    def losses(self, module: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        raise NotImplementedError


def _better(task: StepTask, score: float, best: float | None) -> bool:
    if not np.isfinite(score):
        return False
    if best is None:
        return True
    return score > best if task.higher_is_better else score < best


def task_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    task: StepTask = config["task"]
    cfg = task.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = task.build().to(device)
    groups = task.param_groups(model)
    peak = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        from safetensors.torch import load as load_weights
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
                model.load_state_dict(load_weights(f.read()))
            with open(os.path.join(folder, STATE_FILE), "rb") as f:
                state = read_state(f.read())
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
    module = ray.train.torch.prepare_model(
        task.step_module(model), parallel_strategy_kwargs={"find_unused_parameters":
                                                           task.find_unused()})
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    task.start(device)
    log = MetricLog(task.root, task.run) if rank == 0 else None
    best: float | None = None
    if log is not None:
        log.load(start_step)
        for row in log.rows:
            if task.metric in row and _better(task, row[task.metric], best):
                best = row[task.metric]
    writer = _tensorboard() if rank == 0 else None
    progress = Progress(cfg["steps"], start_step, stage=task.stage)
    shard = ray.train.get_dataset_shard("plan")
    step, tic = start_step, time.perf_counter()
    for row in shard.iter_rows():
        if int(row["slot"]) != rank or int(row["step"]) < start_step:
            continue  # another rank's batch, or a step done before the checkpoint resumed from
        if int(row["step"]) != step:  # the plan is read in step order: a gap is a bug
            raise RuntimeError(f"rank {rank}: plan step {int(row['step'])} after step {step}")
        factor = task.schedule(step)
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * factor
        torch.manual_seed(step_seed(cfg["seed"], step, rank))
        batch = task.batch(row, rank, device)
        step += 1
        with autocast:
            losses = task.losses(module, batch)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "seconds": round(seconds, 4),
                                   "lr": peak[-1] * factor, **mean_over_ranks(losses, world)}
        if log is not None:
            log.append(metrics)
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, step)
            progress.update(step, metrics["loss"])
        if step % cfg["checkpoint_every"] and step != cfg["steps"]:
            continue
        report: dict[str, Any] = {"step": step, "loss": metrics["loss"]}
        spread = weights_spread(model, world)
        if rank != 0:
            ray.train.report(report)
            continue
        scores = task.validate(model, device)
        score = scores[task.metric]
        improved = _better(task, score, best)
        progress.say(f"step {step}/{cfg['steps']}: validation "
                     + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                     + (" (best so far)" if improved else ""))
        report |= scores
        log.rows[-1] |= {**scores, "world_size": world, "weights_spread": spread,
                         "peak_rss_mb": _peak_rss_mb()}
        for key, value in scores.items():  # TensorBoard tags take no @
            writer.add_scalar(f"val/{key.removeprefix('val_').replace('@', '_')}", value, step)
        log.write()
        _upload_tensorboard(writer, task.root, task.run)
        with tempfile.TemporaryDirectory() as folder:
            _save_checkpoint(folder, model, optimizer, step, report)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
        if improved:  # after the checkpoint is persisted: best/ never names a lost step
            best = score
            task.root.write_bytes(f"{task.run}/{BEST_DIR}/{WEIGHTS_FILE}", weights_bytes(model))
            task.root.write_json(f"{task.run}/{BEST_DIR}/{META_FILE}", {"step": step, **scores})
        tic = time.perf_counter()
    if writer is not None:
        _close_tensorboard(writer)
    if step != cfg["steps"] and step > start_step:
        raise RuntimeError(f"rank {rank}: the plan ended at step {step} of {cfg['steps']}")


def run_in_process(task: StepTask, plan: list[dict[str, Any]],
                   device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, float], float]:
    """The same steps in this process, without Ray (one rank: the plan's slot-0 rows): the
    benchmarks' plain single-process baseline and their quick ablations. Returns the model,
    its validation at the end and the training seconds. No checkpoints, no log."""
    device = torch.device(device)
    cfg = task.cfg
    torch.manual_seed(cfg["seed"])
    model = task.build().to(device)
    groups = task.param_groups(model)
    peak = [g["lr"] for g in groups]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])
    task.start(device)
    module = task.step_module(model)
    seconds = 0.0
    for row in plan:
        if int(row["slot"]) != 0:
            continue
        tic = time.perf_counter()
        factor = task.schedule(int(row["step"]))
        torch.manual_seed(step_seed(cfg["seed"], int(row["step"]), 0))
        for group, lr in zip(optimizer.param_groups, peak):
            group["lr"] = lr * factor
        losses = task.losses(module, task.batch(row, 0, device))
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        seconds += time.perf_counter() - tic
    return model, task.validate(model, device), seconds
