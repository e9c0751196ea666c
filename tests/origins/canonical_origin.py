#!/usr/bin/env python3
"""A raw-socket HTTP/1.1 origin for crates/portcullis/tests/canonical.rs.

It reads the request head byte for byte (no http.server, which would normalize), appends
one JSON line per request to --log, and answers 200 with a four-line text body:

    <request target, as received>\n<Host header(s), as received>\n<host as read>\n<path as read>

In `raw` mode "as read" is the target's path and the Host header unchanged. In `ci` mode the
origin reads them the way a case-insensitive router does (IIS, ASP.NET, Tomcat, Spring and
friends, all at once, so the reading is as permissive as any of them): percent-decode once,
overlong UTF-8 decoded to ASCII, NUL ends the path, backslash is a slash, lower-case,
`;params` dropped from each segment, repeated slashes merged, dot segments resolved; the
host lower-cased, without its port and trailing dots.

The listening port (bound to 127.0.0.1:0) is printed on the first line of stdout.
"""

import argparse
import json
import socket
import sys
import threading

LOCK = threading.Lock()


def percent_decode(raw: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x25 and i + 2 < len(raw) and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _is_hex(b: bytes) -> bool:
    return len(b) == 2 and all(chr(x) in "0123456789abcdefABCDEF" for x in b)


def overlong_to_ascii(raw: bytes) -> bytes:
    """Decodes overlong 2- and 3-byte UTF-8 forms of ASCII, as old IIS did (%c0%af is '/')."""
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c in (0xC0, 0xC1) and i + 1 < len(raw) and 0x80 <= raw[i + 1] <= 0xBF:
            out.append(((c & 0x1F) << 6) | (raw[i + 1] & 0x3F))
            i += 2
        elif (
            c == 0xE0
            and i + 2 < len(raw)
            and 0x80 <= raw[i + 1] <= 0x81
            and 0x80 <= raw[i + 2] <= 0xBF
        ):
            out.append(((raw[i + 1] & 0x3F) << 6) | (raw[i + 2] & 0x3F))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def read_path_ci(target: bytes) -> str:
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    low = path.lower()
    if low.startswith(b"http://") or low.startswith(b"https://"):
        rest = path.split(b"//", 1)[1]
        path = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
    raw = overlong_to_ascii(percent_decode(path))
    raw = raw.split(b"\x00", 1)[0]
    text = raw.decode("utf-8", "replace").replace("\\", "/").lower()
    segments = [seg.split(";", 1)[0] for seg in text.split("/")]
    stack = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
    out = "/" + "/".join(stack)
    if stack and (text.endswith("/") or segments[-1] in (".", "..")):
        out += "/"
    return out


def read_host_ci(host: bytes) -> str:
    h = host.decode("latin-1").strip().lower()
    if ":" in h and not h.startswith("["):
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


def handle(conn: socket.socket, mode: str, log: str) -> None:
    try:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
            if len(data) > 1 << 20:
                return
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        method, _, tail = lines[0].partition(b" ")
        target, _, version = tail.rpartition(b" ")
        hosts = []
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip(b" \t")
            if name == b"host":
                hosts.append(value)
            elif name == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        host = b", ".join(hosts)
        if mode == "ci":
            path_read = read_path_ci(target).encode("utf-8", "replace")
            host_read = read_host_ci(host).encode("latin-1", "replace")
        else:
            path_read = target.split(b"?", 1)[0]
            host_read = host
        record = {
            "method": method.decode("latin-1"),
            "target": target.decode("latin-1"),
            "version": version.decode("latin-1"),
            "host": [h.decode("latin-1") for h in hosts],
            "path_read": path_read.decode("utf-8", "replace"),
        }
        with LOCK:
            with open(log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        body = target + b"\n" + host + b"\n" + host_read + b"\n" + path_read
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
    except Exception as e:  # a broken request must not stop the origin
        print(f"origin: {e!r}", file=sys.stderr, flush=True)
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["raw", "ci"], default="raw")
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn, args.mode, args.log), daemon=True).start()


if __name__ == "__main__":
    main()
