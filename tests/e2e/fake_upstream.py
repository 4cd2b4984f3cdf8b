#!/usr/bin/env python3
"""A fake cloud upstream for the policy tests: an OpenAI-compatible HTTPS server that
records every request byte it receives and answers chat and text completions (whole or
streamed) by echoing what it heard ("UPSTREAM heard: ..."), so a test can see what left
the appliance and what the client got back.

Usage: fake_upstream.py CERT KEY LOG PORTFILE MODE
MODE: ok | error500 | slow (answers after 3 s) | drop (a stream breaks after two pieces)
      | dropfirst (a stream breaks before its first event)
Writes its port to PORTFILE once listening; appends each request (headers + body) to LOG,
and a line "CONNECTION" for each new connection (to show connections are reused).
"""
import http.server
import json
import socket
import ssl
import sys
import time

cert, key, log, portfile, mode = sys.argv[1:6]


def record(data):
    with open(log, "ab") as f:
        f.write(data)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        record(b"CONNECTION\n")
        super().setup()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        record(str(self.headers).encode() + body + b"\n")
        if mode == "error500":
            return self.whole(500, {"error": {"message": "upstream exploded"}})
        if mode == "slow":
            time.sleep(3)
        req = json.loads(body)
        chat = self.path.endswith("/chat/completions")
        if chat:
            heard = " | ".join(m["content"] for m in req["messages"])
        else:
            heard = req["prompt"]
        text = "UPSTREAM heard: " + heard
        if req.get("stream"):
            return self.stream(req, chat, text)
        choice = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self.whole(200, {
            "id": "fake-1", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": req["model"], "choices": [choice],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        })

    def whole(self, status, obj):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def stream(self, req, chat, text):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data):
            frame = b"data: " + data.encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.flush()

        def event(piece, finish=None):
            if chat:
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": finish}
            return json.dumps({"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": 0, "model": req["model"], "choices": [choice]})

        if mode == "dropfirst":
            return self.cut()
        if chat:
            send(json.dumps({"id": "fake-1", "object": "chat.completion.chunk", "created": 0,
                             "model": req["model"],
                             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}))
        # Pieces of 5 characters, so placeholders arrive split across events.
        pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
        for n, p in enumerate(pieces):
            if mode == "drop" and n == 2:
                return self.cut()
            send(event(p))
        send(event("", "stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            send(json.dumps({"id": "fake-1", "object": "chat.completion.chunk", "created": 0,
                             "model": req["model"], "choices": [],
                             "usage": {"prompt_tokens": 11, "completion_tokens": len(pieces),
                                       "total_tokens": 11 + len(pieces)}}))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def cut(self):
        """Closes the connection mid-answer (a reset, not a clean end), once what was sent
        has had time to arrive."""
        self.wfile.flush()
        time.sleep(0.5)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        self.connection.close()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
with open(portfile, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
