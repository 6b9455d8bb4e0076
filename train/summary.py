"""`python -m train.summary RUN_DIR HF_DIR EVAL_JSON`: what the demo prints at the end (train.tools.summary)."""

import sys

from train.tools.summary import main

if __name__ == "__main__":
    main(sys.argv[1:])
