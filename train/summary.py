"""`python -m train.summary run=RUN_DIR hf=HF_DIR [eval=EVAL_JSON]`: the demo's closing report (train.tools.summary)."""

from train.tools.summary import main

if __name__ == "__main__":
    main()
