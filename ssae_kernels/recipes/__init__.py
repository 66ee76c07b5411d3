"""Pipelines on the training layer. Each module listed in PIPELINES has a config dataclass, ``run(cfg)``
and ``add_subcommands(subparsers)``, which registers its ``ssae`` subcommands; every subcommand's
``handler(args)`` (set with ``set_defaults``) builds the config from the flags and runs it."""

PIPELINES = ("train", "specialized", "subspace", "export", "plan", "features")
