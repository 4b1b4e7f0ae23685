"""A model's life: its runtime, the way up (startup), the pure decisions (reducer, policy, states),
its canary, its request queue and its status view."""
