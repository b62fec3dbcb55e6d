"""python serve.py [key=value ...]: the same as `seglab serve ...` (src/seglab/commands.py, conf/serve.yaml)."""

from seglab.commands import serve_main as main

if __name__ == "__main__":
    main()
