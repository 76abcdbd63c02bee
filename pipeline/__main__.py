"""`python -m pipeline ...` is the `worldmodel` command (torchrun starts it this way)."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
