"""`python -m train.evaluate run.dir=DIR eval.text_files=[...]`: loss of a run's checkpoint on text files (train.tools.evaluate)."""

from train.tools.evaluate import main

if __name__ == "__main__":
    main()
