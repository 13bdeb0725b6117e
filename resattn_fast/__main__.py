"""`python -m resattn_fast ...` is the `resattn` command (and what torchrun launches)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
