"""The original's 3-node example; the code is ``tinyraftplus/demo.py`` (also
``python -m tinyraftplus.demo``)."""

from tinyraftplus.demo import cli

if __name__ == "__main__":
    cli()
