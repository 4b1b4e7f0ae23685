"""Worker processes as the supervisor sees them: one handle each (process, identities, handshake,
liveness, death, stop ladder), the hub that routes their frames, warm spares and adoption."""
