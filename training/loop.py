"""The correspondence train loop (`train_loop_per_worker`), the only code here that touches
`ray.train`. Plain torch around it: `training.model`, `training.losses`, `training.data`.

Per step each rank reads one pair-plan row, builds its batch, and takes an AdamW step (DDP
averages the gradients). Every `checkpoint_every` steps rank 0 validates (label-transfer PCK@10
on the fixed validation pairs), writes the metric log, exports `best/` when PCK@10 improved, and
every rank reports (a report is a barrier; only rank 0 attaches the checkpoint).

Resume: Ray restores nothing by itself. The loop loads model, optimiser, step and torch RNG from
`ray.train.get_checkpoint()`, skips as many plan rows as steps were done (every rank skips the
same count, so the ranks stay in step), and truncates the metric log to the checkpoint's step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from operators.store.storage import RunRoot
from training.data import PairBatches
from training.evaluation import EvalPair, PairFeatures, model_describer, score_pair
from training.losses import functional_loss, mask_loss, spatial_loss, total_loss
from training.model import DenseCorrespondenceModel
from training.pairs import Catalogue
from training.runs import (BEST_DIR, META_FILE, STATE_FILE, WEIGHTS_FILE, MetricLog, read_state,
                           state_bytes, weights_bytes)

VALIDATION_METRIC = "val_pck@10"


@dataclass
class LoopSetup:
    """Everything a worker needs (pickled into train_loop_config)."""

    root: RunRoot
    run: str                          # run directory relative to root
    catalogue: Catalogue
    manifest: dict[str, dict]         # asset_id -> manifest row (training assets)
    text: np.ndarray                  # (n_functions, d_text), catalogue.functions order
    model: dict[str, Any]             # DenseCorrespondenceModel kwargs
    train: dict[str, Any]             # TrainSection as a dict
    val_pairs: list[EvalPair] = field(default_factory=list)
    backbone: dict[str, Any] | None = None   # lift backbone options (input=backbone)
    visibility_tol: tuple[float, float] = (0.01, 2e-3)


class PairStep(nn.Module):
    """One DDP module around the model, so that both kinds of pairs go through one forward
    (DDP expects one forward per backward)."""

    def __init__(self, model: DenseCorrespondenceModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                image_size: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        return [self.model(blocks, uv, image_size, text) for blocks, uv, text in groups]


def step_losses(step_module: nn.Module, batch: dict[str, torch.Tensor], text: torch.Tensor,
                cfg: dict[str, Any], image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The losses of one batch (DFC §4.3): L_func, L_spatial, L_mask and their weighted mean."""
    n = cfg["points"]
    groups = []
    if "f_feat_1" in batch:
        feats = torch.cat([batch["f_feat_1"], batch["f_feat_2"]])
        uv = torch.cat([torch.cat([batch["f_pos_1"], batch["f_neg_1"]], dim=1),
                        torch.cat([batch["f_pos_2"], batch["f_neg_2"]], dim=1)])
        groups.append((feats, uv, text[batch["f_text"]].repeat(2, 1)))
    if "s_feat_1" in batch:
        groups.append((torch.cat([batch["s_feat_1"], batch["s_feat_2"]]),
                       torch.cat([batch["s_uv_1"], batch["s_uv_2"]]),
                       text[batch["s_text"]].repeat(2, 1)))
    outputs = step_module(groups, image_size)
    losses: dict[str, torch.Tensor] = {}
    l_func = l_spatial = l_mask = None
    index = 0
    if "f_feat_1" in batch:
        desc, logits = outputs[index]
        desc, logits = desc.float(), None if logits is None else logits.float()  # fp32 losses
        index += 1
        half = desc.shape[0] // 2
        d1, d2 = desc[:half], desc[half:]
        l_func = functional_loss(d1[:, :n], d2[:, :n], d1[:, n:], d2[:, n:], cfg["tau"])
        losses["loss_functional"] = l_func
        if logits is not None:
            l_mask = mask_loss(logits[:, :n], logits[:, n:])
            losses["loss_mask"] = l_mask
    if "s_feat_1" in batch:
        desc = outputs[index][0].float()
        half = desc.shape[0] // 2
        l_spatial = spatial_loss(desc[:half], desc[half:], cfg["tau"])
        losses["loss_spatial"] = l_spatial
    losses["loss"] = total_loss(l_func, l_spatial, l_mask, cfg["lambda_spatial"],
                                cfg["lambda_mask"], cfg["lambda_functional"])
    return losses


class BlockSource:
    """Turns a batch's view features into blocks: the cache's (as read) or, on the
    backbone-in-the-loop path, the frozen backbone run on the RGB views."""

    def __init__(self, backbone_options: dict[str, Any] | None, n_blocks: int,
                 device: torch.device) -> None:
        self.backbone = None
        self.n_blocks, self.device = n_blocks, device
        if backbone_options is not None:
            from operators.models.backbones import load_backbone
            options = {k: v for k, v in backbone_options.items() if k != "fingerprint"}
            self.backbone = load_backbone(**options, device=device)

    def __call__(self, features: np.ndarray) -> torch.Tensor:
        if self.backbone is None:
            return torch.as_tensor(np.array(features, np.float32), device=self.device)
        blocks = self.backbone.block_features(np.asarray(features), self.n_blocks)
        # the cache stores float16: round the same way so both paths give the same numbers
        return torch.as_tensor(blocks.astype(np.float16).astype(np.float32), device=self.device)


def to_tensors(batch: dict[str, np.ndarray], blocks: BlockSource,
               device: torch.device) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        if "_feat_" in key:
            shape = value.shape
            out[key] = blocks(value.reshape(-1, *shape[1:]))
        else:
            out[key] = torch.as_tensor(np.array(value), device=device)
    return out


def validate(model: DenseCorrespondenceModel, pairs: list[EvalPair], data: PairBatches,
             blocks: BlockSource, text_of, device: torch.device) -> float:
    """Mean label-transfer PCK@10 over the validation pairs (no discovery: it is the slow part)."""
    if not pairs:
        return float("nan")
    model.eval()
    describe = model_describer(model, text_of, device)
    values = []
    for pair in pairs:
        feat_1 = blocks(view_features(data, pair.asset_1, pair.view_1)[None])[0].cpu().numpy()
        feat_2 = blocks(view_features(data, pair.asset_2, pair.view_2)[None])[0].cpu().numpy()
        size = data.image_size()
        values.append(score_pair(describe, pair, feat_1, feat_2, size, discovery=False,
                                 lattice_targets=True)["pck@10"])
    model.train()
    return float(np.mean(values))


def view_features(data: PairBatches, asset_id: str, view: int) -> np.ndarray:
    """One view's features (blocks, or RGB on the backbone path) of any asset (validation
    assets are not in the catalogue)."""
    if data.input != "backbone":
        return PairFeatures(data.reader, data.extra_views)(asset_id, view)
    if asset_id not in data.extra_views:
        data.extra_views[asset_id] = np.asarray(data.reader.views(asset_id, ["rgb"])["rgb"])
    return data.extra_views[asset_id][view]


def _save_checkpoint(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     step: int, metrics: dict[str, Any]) -> None:
    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(weights_bytes(model))
    with open(os.path.join(folder, STATE_FILE), "wb") as f:
        f.write(state_bytes(optimizer, step))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump({"step": step, **metrics}, f)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    setup: LoopSetup = config["setup"]
    cfg = setup.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    model = DenseCorrespondenceModel(**setup.model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"],
                                  weight_decay=cfg["weight_decay"])
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
    step_module = ray.train.torch.prepare_model(PairStep(model))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())
    text = torch.as_tensor(np.array(setup.text, np.float32), device=device)
    data = PairBatches(setup.root, setup.catalogue, setup.manifest, masks=cfg["masks"],
                       points=cfg["points"], input=cfg["input"], n_blocks=cfg["n_blocks"],
                       cache_assets=cfg["cache_assets"], augment=cfg["augment_backgrounds"],
                       spatial_region=cfg["spatial_region"],
                       visibility_tol=setup.visibility_tol)
    blocks = BlockSource(setup.backbone if cfg["input"] == "backbone" else None,
                         cfg["n_blocks"], device)
    functions = setup.catalogue.functions
    text_of = lambda f: text[functions.index(f)]  # noqa: E731
    log = MetricLog(setup.root, setup.run) if rank == 0 else None
    best = -1.0
    if log is not None:
        log.load(start_step)
        best = max([r[VALIDATION_METRIC] for r in log.rows if VALIDATION_METRIC in r] or [-1.0])
    writer = _tensorboard() if rank == 0 else None
    progress = Progress(cfg["steps"], start_step)
    shard = ray.train.get_dataset_shard("plan")
    world = context.get_world_size()
    step, tic = start_step, time.perf_counter()
    for row in shard.iter_rows():
        if int(row["slot"]) != rank or int(row["step"]) < start_step:
            continue  # another rank's pairs, or a step done before the checkpoint resumed from
        if int(row["step"]) != step:  # the plan is read in step order: a gap is a bug
            raise RuntimeError(f"rank {rank}: plan step {int(row['step'])} after step {step}")
        step += 1
        batch = to_tensors(data.build(row), blocks, device)
        with autocast:
            losses = step_losses(step_module, batch, text, cfg, data.image_size())
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        seconds = time.perf_counter() - tic
        tic = time.perf_counter()
        metrics: dict[str, Any] = {"step": step, "seconds": round(seconds, 4),
                                   **mean_over_ranks(losses, world)}
        if log is not None:
            log.append(metrics)
            for key, value in metrics.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, step)
            progress.update(step, metrics["loss"])
        if step % cfg["checkpoint_every"] and step != cfg["steps"]:
            continue
        report = {"step": step, "loss": metrics["loss"]}
        spread = weights_spread(model, world)
        if rank != 0:
            ray.train.report(report)
            continue
        score = validate(model, setup.val_pairs, data, blocks, text_of, device)
        improved = bool(np.isfinite(score) and score > best)
        progress.say(f"step {step}/{cfg['steps']}: validation PCK@10 {score:.3f}"
                     + (" (best so far)" if improved else ""))
        report[VALIDATION_METRIC] = score
        log.rows[-1] |= {VALIDATION_METRIC: score, "world_size": world,
                         "weights_spread": spread, "peak_rss_mb": _peak_rss_mb()}
        writer.add_scalar("val/pck_10", score, step)  # TensorBoard tags take no @
        log.write()
        _upload_tensorboard(writer, setup.root, setup.run)
        with tempfile.TemporaryDirectory() as folder:
            _save_checkpoint(folder, model, optimizer, step, report)
            ray.train.report(report, checkpoint=Checkpoint.from_directory(folder))
        if improved:  # after the checkpoint is persisted: best/ never names a lost step
            best = score
            setup.root.write_bytes(f"{setup.run}/{BEST_DIR}/{WEIGHTS_FILE}", weights_bytes(model))
            setup.root.write_json(f"{setup.run}/{BEST_DIR}/{META_FILE}",
                                  {"step": step, VALIDATION_METRIC: score})
        tic = time.perf_counter()
    if step != cfg["steps"] and step > start_step:
        raise RuntimeError(f"rank {rank}: the plan ended at step {step} of {cfg['steps']}")


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

    def __init__(self, steps: int, start_step: int, every_s: float = 15.0) -> None:
        self.steps, self.start, self.every_s = steps, start_step, every_s
        self.tic = self.last = time.perf_counter()

    def say(self, line: str) -> None:
        # Not print(): Ray Train patches it to log and echo, which shows each line twice.
        sys.__stdout__.write(f"train: {line}\n")
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


def _upload_tensorboard(writer, root: RunRoot, run: str) -> None:
    """Event files are written locally and copied under the run at each checkpoint (works the
    same for local and S3 roots)."""
    writer.flush()
    folder = writer.logdir
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            root.write_bytes(f"{run}/tensorboard/{name}", f.read())
