"""lineside training entry point from a checkout (the Lightning CLI); same as ``lineside fit|validate|test|predict``.

    python train.py fit --config configs/quickstart.yaml
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/best.ckpt
"""

import sys

from lineside.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
