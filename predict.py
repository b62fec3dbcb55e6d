"""python predict.py [key=value ...]: the same as `seglab predict ...` (src/seglab/commands.py, conf/predict.yaml)."""

from seglab.commands import predict_main as main

if __name__ == "__main__":
    main()
