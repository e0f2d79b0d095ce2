"""`python -m byolfast ...` is `byol ...` (`torchrun ... -m byolfast train --config ...` trains on each rank)."""
import sys

from byolfast.train.cli import main

sys.exit(main(sys.argv[1:]))
