"""Train a semi-supervised model: `python train.py recipe=quickstart` (see README.md)."""

from dmssl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
