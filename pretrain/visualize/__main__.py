"""``python -m pretrain.visualize pca|similarity|curves ...`` (see :mod:`pretrain.visualize.cli`)."""
import sys

from pretrain.visualize.cli import main

if __name__ == "__main__":
    sys.exit(main())
