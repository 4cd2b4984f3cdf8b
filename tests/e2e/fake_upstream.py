#!/usr/bin/env python3
"""A fake cloud upstream for the policy tests: an OpenAI-compatible HTTPS server that
records every request byte it receives and answers chat completions by echoing the
messages ("UPSTREAM heard: ..."), so a test can see what left the appliance and what the
client got back.

Usage: fake_upstream.py CERT KEY LOG PORTFILE MODE   (MODE: ok | error500)
Writes its port to PORTFILE once listening; appends each request (headers + body) to LOG.
"""
import http.server
import json
import ssl
import sys

cert, key, log, portfile, mode = sys.argv[1:6]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(log, "ab") as f:
            f.write(str(self.headers).encode() + body + b"\n")
        if mode == "error500":
            out = b'{"error":{"message":"upstream exploded"}}'
            self.send_response(500)
        else:
            req = json.loads(body)
            heard = " | ".join(m["content"] for m in req["messages"])
            out = json.dumps({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                "model": req["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "UPSTREAM heard: " + heard}}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            }).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(portfile, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
