"""`python -m train.evaluate run.dir=DIR eval.text_files=[...]`: a checkpoint's loss on text (train.tools.evaluate)."""

from train.tools.evaluate import main

if __name__ == "__main__":
    main()
