"""`python -m train.export run.dir=DIR out=HF_DIR`: a run's checkpoint as a Hugging Face model (train.tools.export)."""

from train.tools.export import main

if __name__ == "__main__":
    main()
