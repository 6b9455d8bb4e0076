"""`python -m train.lm_eval run.dir=DIR tasks=[...]`: lm-evaluation-harness on a run, offline (train.tools.lm_eval)."""

from train.tools.lm_eval import main

if __name__ == "__main__":
    main()
