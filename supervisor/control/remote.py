"""The optional tcp control endpoint (`supervisor.listen`): a second control ROUTER that is a CURVE
server, on its own ZeroMQ context whose ZAP handler knows the `[[clients]]` allow-list. The ZAP
handler is bound before the tcp socket, so no connection is ever accepted unauthenticated."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import zmq
import zmq.asyncio

from protocol import keys
from supervisor import logs
from supervisor.config import Config
from supervisor.control import auth

# (context, endpoint, configure the socket before bind, access) -> a started-later ControlServer
MakeServer = Callable[[zmq.asyncio.Context, str, Callable[[zmq.Socket], None], auth.Access], Any]


class RemoteListener:
    def __init__(self, config: Config, make_server: MakeServer) -> None:
        sup = config.supervisor
        self.log = logs.get()
        self._listen, self._key_file = sup.listen, sup.curve_secret_key_file
        # Its own context: the ZAP handler of a context sees every socket on it, and the ipc
        # sockets must stay outside it.
        self.ctx = zmq.asyncio.Context()
        self.zap = auth.ZapHandler(self.ctx, config.clients, self.log)
        self.access = auth.Access(config.clients, self.log)
        public, secret = keys.load_secret(sup.curve_secret_key_file)

        def configure(sock: zmq.Socket) -> None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.ZAP_DOMAIN, auth.ZAP_DOMAIN)
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP answer, no connection
            sock.setsockopt(zmq.HANDSHAKE_IVL, 5_000)  # a peer that stalls the handshake is dropped

        self.server = make_server(self.ctx, sup.listen, configure, self.access)
        self._task: asyncio.Task | None = None

    @property
    def task(self) -> asyncio.Task | None:
        """The ZAP handler's task: it ends only when it failed (the daemon exits on that)."""
        return self._task

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.zap.run(), name="zap")
        self.server.start()
        self.log.info("remote.listening", endpoint=self._listen, clients=self.access.names)

    def update(self, config: Config) -> None:
        """Reload: the allow-list and roles change at once (a removed key is refused from its next
        request on); a new endpoint or server key needs a restart."""
        self.zap.update(config.clients)
        self.access.update(config.clients)
        sup = config.supervisor
        if (sup.listen, sup.curve_secret_key_file) != (self._listen, self._key_file):
            self.log.warning("remote.restart_needed", reason="listen or curve_secret_key_file changed",
                             listening=self._listen)

    def close(self) -> None:
        self.server.close()
        if self._task is not None:
            self._task.cancel()
        self.zap.close()
        self.ctx.term()
