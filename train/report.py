"""`python -m train.report DIR... out=DIR`: compare finished runs (train.tools.report)."""

from train.tools.report import main

if __name__ == "__main__":
    main()
