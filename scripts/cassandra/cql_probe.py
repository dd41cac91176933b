#!/usr/bin/env python3
"""Checks that a CQL native-protocol endpoint answers queries, using only the standard library.

Usage: cql_probe.py HOST PORT [TIMEOUT_SECONDS]

Sends STARTUP and `SELECT release_version FROM system.local` (protocol v4, consistency ONE)
and prints the release version. Exit 0 on success, 1 on any failure (message on stderr).
Used by scripts/cassandra.sh to decide that a node is ready, without installing cqlsh.
"""

import socket
import struct
import sys

VERSION_REQUEST = 0x04
OP_ERROR, OP_STARTUP, OP_READY, OP_QUERY, OP_RESULT = 0x00, 0x01, 0x02, 0x07, 0x08
RESULT_ROWS = 0x0002


def cql_string(text):
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def frame(stream, opcode, body):
    return struct.pack(">BBhBI", VERSION_REQUEST, 0, stream, opcode, len(body)) + body


def read_exact(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def read_frame(sock):
    _version, _flags, _stream, opcode, length = struct.unpack(">BBhBI", read_exact(sock, 9))
    return opcode, read_exact(sock, length)


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, size):
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def int(self):
        return struct.unpack(">i", self.take(4))[0]

    def short(self):
        return struct.unpack(">H", self.take(2))[0]

    def string(self):
        return self.take(self.short()).decode()

    def bytes(self):
        size = self.int()
        return None if size < 0 else self.take(size)


def error_text(body):
    reader = Reader(body)
    code = reader.int()
    return f"server error 0x{code:04x}: {reader.string()}"


def probe(host, port, timeout_s):
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        startup = struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0")
        sock.sendall(frame(0, OP_STARTUP, startup))
        opcode, body = read_frame(sock)
        if opcode == OP_ERROR:
            raise RuntimeError(error_text(body))
        if opcode != OP_READY:
            raise RuntimeError(f"unexpected reply to STARTUP (opcode 0x{opcode:02x}; auth?)")
        query = "SELECT release_version FROM system.local"
        body = struct.pack(">I", len(query)) + query.encode() + struct.pack(">HB", 0x0001, 0)
        sock.sendall(frame(1, OP_QUERY, body))
        opcode, body = read_frame(sock)
        if opcode == OP_ERROR:
            raise RuntimeError(error_text(body))
        reader = Reader(body)
        if opcode != OP_RESULT or reader.int() != RESULT_ROWS:
            raise RuntimeError("unexpected reply to the query")
        flags, columns = reader.int(), reader.int()
        if flags & 0x0002:
            reader.bytes()  # paging state
        if flags & 0x0001:
            reader.string(), reader.string()  # global keyspace and table
        for _ in range(columns):
            if not flags & 0x0001:
                reader.string(), reader.string()
            reader.string()  # column name
            reader.short()  # type id (varchar: no parameters)
        if reader.int() < 1:
            raise RuntimeError("system.local returned no row")
        value = reader.bytes()
        return value.decode() if value is not None else "?"


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    host, port = sys.argv[1], int(sys.argv[2])
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    try:
        print(probe(host, port, timeout_s))
    except Exception as error:  # noqa: BLE001 - any failure means "not ready"
        print(f"cql probe {host}:{port} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
