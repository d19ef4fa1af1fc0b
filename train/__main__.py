"""`fashion-train` / `python -m train`: parse flags, run training, print where the results are."""

from __future__ import annotations

import logging
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
        print(f"fashion-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fashion-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    accuracy = metrics["validation"]["accuracy"]
    print(f"validation accuracy {accuracy:.4f} (best epoch {metrics['best_epoch']}); results in {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
