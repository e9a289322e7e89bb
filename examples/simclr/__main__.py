"""Entry point of ``python -m examples.simclr``."""

from .train import main

raise SystemExit(main())
