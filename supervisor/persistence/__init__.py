"""What outlives the process: the SQLite store, its lock guard and degraded mode, the state dir."""
