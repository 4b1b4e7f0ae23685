"""Whether a snapshot may run: integrity, architecture, compatibility registry, memory, path
confinement; and the operator's tools around it (probe, verify, repair)."""
