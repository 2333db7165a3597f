"""Sub-commands of the ``realisid`` console command; each module has ``register(subparsers)``."""
