"""`python -m train ...` is `byol train ...` (the form torchrun launches: `torchrun ... -m train --config ...`)."""
import sys

from train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
