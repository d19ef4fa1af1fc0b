"""Transfer learning for the clothing classifier, top to bottom.

1. Load and check the ImageFolder splits.
2. Build EfficientNet-Lite with ImageNet weights; freeze the stem and the first `--frozen-blocks` blocks.
3. Run the frozen trunk once over `--views` augmented copies of every training image (and once over the
   validation images through the worker's own preprocessing) and cache the activations: on a 2-core CPU
   this is what makes training practical, since the early high-resolution blocks are most of the cost.
   With `--frozen-blocks 0` nothing is cached and every epoch augments and runs the whole network.
4. Train the remaining blocks and a new classifier: AdamW, warm-up then cosine LR, label smoothing,
   class-balanced loss, early stopping on validation accuracy. `last.pt` after each epoch (`--resume`),
   `best.pt` whenever validation accuracy improves.
5. Evaluate the best checkpoint: metrics.json, confusion-matrix and training-curve PNGs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train import data, report
from train.model import ARCHS, Classifier, ModelSpec, build
from train.trunk import trunk_runner
from worker.exceptions import DataError

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Every training setting, with its default. Saved inside each checkpoint."""

    data: str = ""
    out: str = "runs/latest"
    arch: str = "efficientnet-lite2"
    image_size: int = 0  # 0: the architecture's native size (224 / 240 / 260)
    frozen_blocks: int = 11  # blocks run once and cached; 0 fine-tunes everything
    views: int = 6  # augmented copies of each training image cached for the trained top
    epochs: int = 15
    patience: int = 4  # stop after this many epochs without a better validation accuracy
    batch_size: int = 32
    lr: float = 5e-4  # pretrained layers; the new classifier gets 10x
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_balance: float = 0.5  # loss weight per class = (1 / frequency) ** class_balance
    dropout: float = 0.3
    mixup: float = 0.0  # mixup alpha on the cached activations (manifold mixup); 0 = off
    ema: float = 0.0  # decay of an exponential moving average of the weights (warmed up), evaluated and saved; 0 = off
    seed: int = 0
    workers: int = 2
    resume: bool = False
    limit: int = 0  # use only N images of each split, spread over classes (smoke tests); 0: all


def main(config: TrainConfig) -> dict:
    seed_everything(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(config.data)
    log.info("training on %s, writing to %s", device, out)

    train_set, val_set = load_data(root, config.limit)
    classes = train_set.classes
    if not config.image_size:
        config.image_size = ARCHS[config.arch][2] if config.arch in ARCHS else 0
    spec = ModelSpec(config.arch, len(classes), config.image_size, config.dropout)
    model = build(spec).to(device, memory_format=torch.channels_last)  # 1.4-2x faster convolutions on CPU
    split = min(max(config.frozen_blocks, 0), model.num_blocks)
    model.freeze_trunk(split)

    fingerprint = data.fingerprint(train_set)
    # Cached activations are only valid for these images (both splits), this trunk and this preprocessing.
    key = data.fingerprint(val_set) + fingerprint + data.PREPROCESSING_VERSION
    cache = out / "cache" / f"{config.arch}-{config.image_size}-b{split}-s{config.seed}-{_short_hash(key)}"
    val_x = cache_validation(model, val_set, split, config, device, cache)
    val_y = torch.tensor(val_set.targets)
    train_views = cache_training_views(model, train_set, split, config, device, cache) if split else None
    train_y = torch.tensor(train_set.targets)
    seed_everything(config.seed)  # the same run whether the caches were just made or found on disk

    counts = data.class_counts(train_set)
    weights = torch.tensor([(1.0 / max(c, 1)) ** config.class_balance for c in counts])
    weights = (weights / (weights * torch.tensor(counts)).sum() * sum(counts)).to(device)

    optimizer = make_optimizer(model, split, config)
    ema = make_ema(model, config.ema)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    state = {"epoch": 0, "best_val_acc": -1.0, "history": [], "stale": 0}
    if config.resume and (out / "last.pt").exists():
        state = resume(out / "last.pt", model, optimizer, scheduler, ema,
                       expect={"classes": classes, "spec": asdict(spec), "frozen_blocks": split})
        log.info("resumed after epoch %d (best validation accuracy %.4f)", state["epoch"], state["best_val_acc"])

    meta = {"classes": classes, "data_fingerprint": fingerprint, "class_counts": counts}
    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.monotonic()
        if train_views is not None:
            batches = cached_batches(train_views[(epoch - 1) % len(train_views)], train_y, config.batch_size)
        else:
            batches = pixel_batches(train_set, config)
        train_loss, train_acc = train_epoch(model, split, batches, optimizer, scheduler, weights, config,
                                            device, f"epoch {epoch}/{config.epochs}", steps_per_epoch, ema)
        scored = ema.module if ema is not None else model
        val_loss, val_acc, _ = evaluate(scored, split, val_x, val_y, config, device)
        state["epoch"] = epoch
        state["history"].append({
            "epoch": epoch, "train_loss": round(train_loss, 4), "train_acc": round(train_acc, 4),
            "val_loss": round(val_loss, 4), "val_acc": round(val_acc, 4),
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - started, 1),
        })
        log.info("epoch %d: train loss %.4f acc %.4f | validation loss %.4f acc %.4f | %.0fs",
                 epoch, train_loss, train_acc, val_loss, val_acc, time.monotonic() - started)
        improved = val_acc > state["best_val_acc"]
        if improved:
            state["best_val_acc"], state["stale"] = val_acc, 0
            save_checkpoint(out / "best.pt", scored, config, split, meta, state)
        else:
            state["stale"] += 1
        save_checkpoint(out / "last.pt", scored, config, split, meta, state, optimizer, scheduler,
                        raw=model if ema is not None else None, ema=ema)
        report.plot_curves(out / "training_curves.png", state["history"])
        if state["stale"] >= config.patience:
            log.info("no better validation accuracy for %d epochs: stopping early", config.patience)
            break

    return finish(out, model, split, val_set, val_x, val_y, config, device, meta, state)


def load_data(root: Path, limit: int):
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    train_set = data.load_split(root, "train")
    val_set = data.load_split(root, "validation")
    data.check_splits(train_set, val_set)
    for dataset in (train_set, val_set):
        if limit and limit < len(dataset):
            keep = np.linspace(0, len(dataset) - 1, limit).round().astype(int)  # spread over classes
            dataset.samples = [dataset.samples[i] for i in keep]
            dataset.targets = [dataset.targets[i] for i in keep]
            dataset.imgs = dataset.samples
        data.check_images(dataset)
    log.info("%d training and %d validation images in %d classes", len(train_set), len(val_set),
             len(train_set.classes))
    return train_set, val_set


def run_trunk(model: Classifier, dataset, split: int, config: TrainConfig, device, desc: str) -> torch.Tensor:
    """Frozen trunk over every item of `dataset` (pixels, label) → fp16 activations, in order."""
    trunk = trunk_runner(model, split, device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=config.workers)
    chunks = [trunk(pixels).half() for pixels, _ in tqdm(loader, desc=desc, unit="batch", leave=False)]
    return torch.cat(chunks)


def cache_validation(model, val_set, split, config, device, cache: Path) -> torch.Tensor:
    path = cache / "validation.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if len(cached) == len(val_set):
            return cached
        log.warning("ignoring %s: %d items, the validation set has %d", path, len(cached), len(val_set))
    images = data.Decoded(val_set, functools.partial(data.worker_pixels, size=config.image_size))
    activations = run_trunk(model, images, split, config, device, "caching validation")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(activations, path)
    return activations


def cache_training_views(model, train_set, split, config, device, cache: Path) -> list[torch.Tensor]:
    """`config.views` augmented passes of the frozen trunk over the training set, each cached on disk."""
    transform = data.train_transform(config.image_size)
    images = data.Decoded(train_set, functools.partial(data.training_pixels, transform=transform))
    views = []
    for view in range(config.views):
        path = cache / f"train-view{view}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=True)
            if len(cached) == len(train_set):
                views.append(cached)
                continue
            log.warning("ignoring %s: %d items, the training set has %d", path, len(cached), len(train_set))
        torch.manual_seed(config.seed * 1000 + view)  # each view's augmentation is repeatable
        activations = run_trunk(model, images, split, config, device, f"caching view {view + 1}/{config.views}")
        torch.save(activations, path)
        views.append(activations)
        log.info("cached training view %d/%d %s", view + 1, config.views, tuple(activations.shape))
    return views


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int):
    order = torch.randperm(len(labels))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield features[index].float().contiguous(memory_format=torch.channels_last), labels[index]


def pixel_batches(train_set, config: TrainConfig):
    transform = data.train_transform(config.image_size)
    images = data.Decoded(train_set, functools.partial(data.training_pixels, transform=transform))
    yield from torch.utils.data.DataLoader(images, batch_size=config.batch_size, shuffle=True,
                                           num_workers=config.workers, drop_last=False)


def make_optimizer(model: Classifier, split: int, config: TrainConfig) -> torch.optim.Optimizer:
    head = list(model.net._fc.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return torch.optim.AdamW(
        [{"params": body, "lr": config.lr}, {"params": head, "lr": config.lr * 10}],
        weight_decay=config.weight_decay,
    )


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, config.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / (total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights (and BN statistics), or None when decay is 0.

    The decay warms up as in TensorFlow's ExponentialMovingAverage(num_updates) and timm: see `ema_warmup`.
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, multi_avg_fn=ema_warmup(decay), use_buffers=True)


def ema_warmup(decay: float):
    """An AveragedModel `multi_avg_fn` whose decay at update n is min(decay, (1 + n) / (10 + n)).

    With a fixed decay of 0.999 the average would be dominated by the early, barely trained weights for the
    first ~1000 steps; the warm-up lets it follow the model closely at first (decay 2/11 at n=1, 0.5 at n=8,
    0.9 at n=80) and reach `decay` after (10 * decay - 1) / (1 - decay) updates. n is AveragedModel's
    `n_averaged`: 1 on the second `update_parameters` call, since the first one copies the weights.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers such as BatchNorm's num_batches_tracked, as torch's own EMA does
            for p_averaged, p_current in zip(averaged, current, strict=True):
                p_averaged.copy_(p_averaged * d + p_current * (1 - d))

    return update


def train_epoch(model, split, batches, optimizer, scheduler, weights, config, device, desc, total, ema=None):
    model.train()
    for module in model.frozen_modules(split):
        module.eval()  # frozen BN keeps its ImageNet statistics
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, total=total, unit="batch", leave=False)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        if config.mixup:
            lam = float(np.random.beta(config.mixup, config.mixup))
            partner = torch.randperm(len(y), device=device)
            logits = model.top(lam * x + (1 - lam) * x[partner], split)
            loss = lam * F.cross_entropy(logits, y, weight=weights, label_smoothing=config.label_smoothing) + (
                1 - lam) * F.cross_entropy(logits, y[partner], weight=weights, label_smoothing=config.label_smoothing)
        else:
            logits = model.top(x, split)
            loss = F.cross_entropy(logits, y, weight=weights, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return loss_sum / seen, correct / seen


@torch.inference_mode()
def evaluate(model, split, features, labels, config, device) -> tuple[float, float, np.ndarray]:
    """Validation loss, accuracy and probabilities from cached (or pixel) validation inputs."""
    model.eval()
    probabilities, loss_sum = [], 0.0
    for start in range(0, len(labels), 64):
        x = features[start:start + 64].float().to(device).contiguous(memory_format=torch.channels_last)
        y = labels[start:start + 64].to(device)
        logits = model.top(x, split)
        loss_sum += F.cross_entropy(logits, y, label_smoothing=config.label_smoothing, reduction="sum").item()
        probabilities.append(logits.softmax(1).cpu())
    probs = torch.cat(probabilities).numpy()
    return loss_sum / len(labels), float((probs.argmax(1) == labels.numpy()).mean()), probs


def finish(out, model, split, val_set, val_x, val_y, config, device, meta, state) -> dict:
    """Score the best checkpoint through both preprocessing paths; write metrics.json and PNGs."""
    best = torch.load(out / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best["model"])
    _, _, probs = evaluate(model, split, val_x, val_y, config, device)
    metrics = report.classification_metrics(val_y.numpy(), probs, meta["classes"])
    tv_images = data.Decoded(val_set, functools.partial(data.torchvision_pixels, size=config.image_size))
    tv_x = run_trunk(model, tv_images, split, config, device, "torchvision path")
    _, tv_acc, _ = evaluate(model, split, tv_x, val_y, config, device)
    metrics = {
        "validation": metrics,
        "validation_accuracy_torchvision_preprocessing": round(tv_acc, 4),
        "best_epoch": best["epoch"],
        "epochs_run": state["epoch"],
        "history": state["history"],
        "config": asdict(config),
        "data_fingerprint": meta["data_fingerprint"],
        "class_counts": meta["class_counts"],
    }
    best["metrics"] = metrics
    torch.save(best, out / "best.pt")
    report.write_json(out / "metrics.json", metrics)
    report.plot_confusion(out / "confusion_matrix.png", metrics["validation"], "validation (worker preprocessing)")
    report.plot_curves(out / "training_curves.png", state["history"])
    log.info("best epoch %d: validation accuracy %.4f (worker preprocessing), %.4f (torchvision)",
             best["epoch"], metrics["validation"]["accuracy"], tv_acc)
    return metrics


def save_checkpoint(path: Path, model, config, split, meta, state, optimizer=None, scheduler=None,
                    raw=None, ema=None) -> None:
    """A checkpoint carries everything export needs: config, class order, weights, data fingerprint.

    `model` holds the weights export uses (the moving average when --ema is on); `raw` and `ema` are
    the trained weights and the averager, kept in last.pt so --resume continues exactly.
    """
    payload = {
        "config": {**asdict(config), "frozen_blocks": split},
        "spec": asdict(model.spec),
        "classes": meta["classes"],
        "data_fingerprint": meta["data_fingerprint"],
        "model": model.state_dict(),
        "epoch": state["epoch"],
        "best_val_acc": state["best_val_acc"],
        "history": state["history"],
        "stale": state["stale"],
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        payload["scheduler"] = scheduler.state_dict()
        payload["rng"] = torch.get_rng_state()
        version, state, gauss = random.getstate()
        payload["rng_python"] = [version, list(state), gauss]
        _, key, pos, has_gauss, cached = np.random.get_state()
        payload["rng_numpy"] = [key.tolist(), int(pos), int(has_gauss), float(cached)]
    if raw is not None:
        payload["raw_model"] = raw.state_dict()
        payload["ema"] = ema.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def resume(path: Path, model, optimizer, scheduler, ema=None, *, expect: dict | None = None) -> dict:
    """Continue from last.pt; `expect`: the run's classes, spec and frozen blocks, which it must share."""
    # weights_only: tensors and plain data only, so a foreign file runs no code
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in (expect or {}).items():
        found = checkpoint["config"]["frozen_blocks"] if key == "frozen_blocks" else checkpoint.get(key)
        if found != value:
            raise DataError(f"--resume: {path} was trained with another {key} ({found!r}, now {value!r}); "
                            "start a new --out or drop --resume")
    model.load_state_dict(checkpoint.get("raw_model", checkpoint["model"]))
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    if "rng_python" in checkpoint:  # mixup draws from numpy; older checkpoints lack these
        random.setstate((checkpoint["rng_python"][0], tuple(checkpoint["rng_python"][1]), checkpoint["rng_python"][2]))
        np.random.set_state(("MT19937", np.array(checkpoint["rng_numpy"][0], dtype=np.uint32),
                             *checkpoint["rng_numpy"][1:]))
    return {key: checkpoint[key] for key in ("epoch", "best_val_acc", "history", "stale")}


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="fashion-train",
        description="Train the clothing classifier by transfer learning from ImageNet EfficientNet-Lite.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: fashion-train --data ../shared/data/clothing-dataset-small --out runs/lite2",
    )
    parser.add_argument("--data", required=True, help="folder with train/ and validation/ ImageFolders")
    parser.add_argument("--out", default=defaults.out, help="run folder: checkpoints, metrics, PNGs")
    parser.add_argument("--arch", default=defaults.arch, choices=list(ARCHS), help="pretrained backbone")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="input side in pixels; 0 = the architecture's native size")
    parser.add_argument("--frozen-blocks", type=int, default=defaults.frozen_blocks,
                        help="leading blocks kept frozen and cached; 0 fine-tunes the whole network")
    parser.add_argument("--views", type=int, default=defaults.views,
                        help="augmented copies of each training image cached through the frozen blocks")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="most epochs to run")
    parser.add_argument("--patience", type=int, default=defaults.patience,
                        help="early stopping: epochs without a better validation accuracy")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="pretrained layers (classifier: 10x)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay")
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs,
                        help="linear LR warm-up before the cosine decay")
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="loss smoothing")
    parser.add_argument("--class-balance", type=float, default=defaults.class_balance,
                        help="loss weight per class = (1/frequency)^this; 0 = unweighted")
    parser.add_argument("--dropout", type=float, default=defaults.dropout, help="before the classifier")
    parser.add_argument("--mixup", type=float, default=defaults.mixup,
                        help="mixup alpha on the cached activations; 0 = off")
    parser.add_argument("--ema", type=float, default=defaults.ema,
                        help="decay of a moving average of the weights that is evaluated and saved, warmed up as "
                             "min(EMA, (1+n)/(10+n)) at update n; 0 = off")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="makes runs repeatable")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="image-decoding processes")
    parser.add_argument("--limit", type=int, default=defaults.limit,
                        help="use only N images of each split, spread over classes (smoke tests); 0 = all")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = parser.parse_args(argv)
    checks = [
        (args.views >= 1, f"--views must be at least 1, got {args.views}"),
        (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
        (args.patience >= 1, f"--patience must be at least 1, got {args.patience}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.lr > 0, f"--lr must be positive, got {args.lr:g}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay:g}"),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs:g}"),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {args.label_smoothing:g}"),
        (args.class_balance >= 0, f"--class-balance must be >= 0, got {args.class_balance:g}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout:g}"),
        (args.mixup >= 0, f"--mixup must be >= 0, got {args.mixup:g}"),
        (0 <= args.ema < 1, f"--ema must be in [0, 1), got {args.ema:g}"),
        (args.frozen_blocks >= 0, f"--frozen-blocks must be >= 0, got {args.frozen_blocks}"),
        (args.image_size == 0 or args.image_size >= 32,
         f"--image-size must be 0 or at least 32, got {args.image_size}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.limit >= 0, f"--limit must be >= 0, got {args.limit}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return TrainConfig(**vars(args))
