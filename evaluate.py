"""python evaluate.py [key=value ...]: the same as `seglab evaluate ...` (conf/evaluate.yaml)."""

from seglab.commands import evaluate_main as main

if __name__ == "__main__":
    main()
