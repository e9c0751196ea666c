#!/usr/bin/env python3
"""A tiny HTTP/1.1 origin for bench/failover.sh: answers every GET with its NAME as the body
(keep-alive, one thread per connection), on 127.0.0.1:PORT, until it is killed.

    python3 bench/failover_origin.py NAME PORT
"""
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1].encode()
PORT = int(sys.argv[2])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without TCP_NODELAY, Nagle holds the body back until
    # the proxy's delayed ACK (40 ms) on a reused connection.
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(NAME)))
        self.end_headers()
        self.wfile.write(NAME)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


socketserver.TCPServer.allow_reuse_address = True
Server(("127.0.0.1", PORT), Handler).serve_forever()
