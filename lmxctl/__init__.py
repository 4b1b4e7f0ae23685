"""`lmxctl`, the operator's CLI: talks to the daemon only through protocol.client, never imports mlx."""
