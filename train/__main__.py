"""`fashion-train` / `python -m train`: parse flags, run training, print where the results are."""

from __future__ import annotations

import logging
import re
import sys

from worker.exceptions import FashionWorkerError, MissingExtra


def main(argv: list[str] | None = None) -> int:
    try:
        from train.train import main as train
        from train.train import parse_args
    except ModuleNotFoundError as exc:  # the base install has no torch: say which extra, not a traceback
        print(f"fashion-train: error: {MissingExtra('train', exc.name or str(exc))}", file=sys.stderr)
        return 2

    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        metrics = train(config)
    except FashionWorkerError as exc:
        print(f"fashion-train: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fashion-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    accuracy = metrics["validation"]["accuracy"]
    print(f"validation accuracy {accuracy:.4f} (best epoch {metrics['best_epoch']}); results in {config.out}")
    return 0


def one_line(exc: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker process comes back with the
    worker's traceback in its message ("Caught DataError in DataLoader worker process 0. Original
    Traceback …"): its last line holds the original message, after the exception's name."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and "Original Traceback" in str(exc):
        return re.sub(r"^(\w+\.)*\w+: ", "", lines[-1].strip())
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
