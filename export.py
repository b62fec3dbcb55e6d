"""python export.py [key=value ...]: the same as `seglab export ...` (src/seglab/commands.py, conf/export.yaml)."""

from seglab.commands import export_main as main

if __name__ == "__main__":
    main()
