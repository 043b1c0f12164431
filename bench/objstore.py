#!/usr/bin/env python3
"""A stand-in for the object store or CDN a registry redirects blob GETs to (the distribution
registry's `redirect` storage middleware sends a client to BASEURL + the blob's storage path):
serves the files under ROOT by path, with single byte ranges, over keep-alive HTTP/1.1. Each
answer is appended to LOG in the registry's access-log format, the path given as
`/v2/store/blobs/sha256:HEX` so that the benchmark's byte counts see the blob.

usage: objstore.py PORT ROOT LOG
"""
import http.server
import os
import re
import sys
import threading
import time

PORT, ROOT, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3]
log_lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, head):
        path = os.path.normpath(self.path.split("?", 1)[0]).lstrip("/")
        full = os.path.join(ROOT, path)
        if path.startswith("..") or not os.path.isfile(full):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return self.note(404, 0)
        size = os.path.getsize(full)
        start, end, status = 0, size - 1, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and int(m.group(1)) < size:
            start, status = int(m.group(1)), 206
            if m.group(2):
                end = min(int(m.group(2)), size - 1)
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not head:
            with open(full, "rb") as f:
                f.seek(start)
                left = length
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    self.wfile.write(chunk)
                    left -= len(chunk)
        self.note(status, 0 if head else length)

    def note(self, status, length):
        digest = re.search(r"sha256/[0-9a-f]{2}/([0-9a-f]{64})/data", self.path)
        shown = f"/v2/store/blobs/sha256:{digest.group(1)}" if digest else self.path
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        line = f'{self.client_address[0]} - - [{stamp}] "{self.command} {shown} HTTP/1.1" {status} {length} "" "{self.headers.get("User-Agent", "")}"\n'
        with log_lock, open(LOG, "a") as f:
            f.write(line)

    def do_GET(self):
        self.answer(False)

    def do_HEAD(self):
        self.answer(True)


http.server.ThreadingHTTPServer.daemon_threads = True
http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
