"""`python -m launch.run [torchrun arguments] -m train.pretrain ...`: torchrun that stops well.

Ctrl-C, SIGTERM and SIGUSR1 make the workers save and exit, and the launcher exits 0; a config error is said once and
exits 2 without restarts; workers end when the launcher dies. See train/engine/launcher.py.
"""

from train.engine.launcher import main

if __name__ == "__main__":
    main()
