"""Relay connections between a TCP port on 127.0.0.1 and a Unix socket, in whichever network namespace it
runs (Unix sockets cross namespaces: they live in the filesystem).

    python port_relay.py tcp-to-unix PORT SOCKET   # listen on 127.0.0.1:PORT, connect to SOCKET
    python port_relay.py unix-to-tcp SOCKET PORT   # listen on SOCKET, connect to 127.0.0.1:PORT

A pair of them makes a service on the host's loopback reachable at the same port inside a loopback-only
namespace (ray_helpers.LoopbackCluster.forward_port). Runs until killed.
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listener: socket.socket, connect) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = connect()
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def main() -> None:
    mode, a, b = sys.argv[1:4]
    if mode == "tcp-to-unix":
        port, path = int(a), b
        listener = socket.create_server(("127.0.0.1", port))

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            return s
    elif mode == "unix-to-tcp":
        path, port = a, int(b)
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(64)

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", port))
    else:
        raise SystemExit(__doc__)
    print("ready", flush=True)
    serve(listener, connect)


if __name__ == "__main__":
    main()
