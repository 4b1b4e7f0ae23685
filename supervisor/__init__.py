"""The daemon: config, state machine, failure policy, worker handles, control API. Never imports mlx."""

__version__ = "0.1.0"
