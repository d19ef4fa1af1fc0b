"""Training of the clothing classifier (needs the `train` extra: torch, torchvision)."""
