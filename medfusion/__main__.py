"""``python -m medfusion`` (and ``accelerate launch -m medfusion``) runs the command line."""

from medfusion.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
