"""The control plane: the control servers (ipc and CURVE tcp) and their shared router, admin
operations, roles, metrics and the events socket."""
