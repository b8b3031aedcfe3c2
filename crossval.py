"""Cross-validated ensembles from a checkout; same as ``lineside crossval``.

    python crossval.py --config configs/el_grading_cv.yaml --folds 5 --out runs/el_grading_cv
"""

import sys

from lineside.cli.crossval import main

if __name__ == "__main__":
    sys.exit(main())
