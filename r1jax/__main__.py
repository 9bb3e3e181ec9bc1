"""Entry point: `python -m r1jax ...`."""
import sys

from r1jax.cli import main

sys.exit(main())
