"""python train.py [key=value ...]: the same as `seglab train ...` (src/seglab/commands.py, conf/train.yaml)."""

from seglab.commands import train_main as main

if __name__ == "__main__":
    main()
