"""`python -m aae_train ...` is `aae-train ...` (what `torchrun -m aae_train` starts on every rank)."""

from aae_train.cli import app

app(prog_name="aae-train")
