"""`python -m byolfast.train ...` is `byol train ...`: the form torchrun launches (`torchrun ... -m byolfast.train`)."""
import sys

from byolfast.train.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
