"""The bench's llama-server: gateway.testing's canned app under gevent's WSGI server,
on one loopback port, with Nagle off like llama-server and gunicorn (an accepted
socket inherits TCP_NODELAY from its listener on Linux).

    python bench/upstream.py PORT
"""

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIServer  # noqa: E402

from gateway.testing import canned_llama_app  # noqa: E402


def main(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(2048)
    WSGIServer(listener, canned_llama_app, log=None, error_log=None).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
