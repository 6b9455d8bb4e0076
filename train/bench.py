"""`python -m train.bench model=NAME bench.*=...`: training-step throughput, MFU and memory (train.tools.bench)."""

from train.tools.bench import main

if __name__ == "__main__":
    main()
