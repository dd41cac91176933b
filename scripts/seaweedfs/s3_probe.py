#!/usr/bin/env python3
"""Readiness probe for an S3 endpoint, SigV4-signed (stdlib only).

Usage: s3_probe.py [--write] ENDPOINT ACCESS_KEY SECRET_KEY [TIMEOUT_SECONDS]

Without --write: exits 0 when the endpoint answers ListBuckets with 200 (so
authentication and the metadata path work, not just the socket).

With --write: also creates the bucket `bluetick-probe`, stores a 256 KiB object,
reads it back, and deletes both. A server that answers metadata calls but cannot
store data (no writable volume, a disk it considers full) fails here rather than
in the first test that uploads.

Exits 1 otherwise, printing why on stderr.
"""

import datetime
import hashlib
import hmac
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

REGION = "us-east-1"
PROBE_BUCKET = "bluetick-probe"
# Large and incompressible enough that the server stores it in a volume, not inline
# with the metadata.
PROBE_BODY = os.urandom(2 * 1024 * 1024)


def sign(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class Client:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, timeout: float):
        self.endpoint = endpoint.rstrip("/")
        self.host = urllib.parse.urlsplit(endpoint).netloc
        self.access_key = access_key
        self.secret_key = secret_key
        self.timeout = timeout

    def call(self, method: str, path: str, body: bytes = b"") -> bytes:
        """One signed request; returns the body of a 2xx answer, raises otherwise."""
        payload_hash = hashlib.sha256(body).hexdigest()
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        date = now.strftime("%Y%m%d")
        canonical_headers = (
            f"host:{self.host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n"
        )
        signed_headers = "host;x-amz-content-sha256;x-amz-date"
        canonical_request = "\n".join(
            [method, path, "", canonical_headers, signed_headers, payload_hash]
        )
        scope = f"{date}/{REGION}/s3/aws4_request"
        string_to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical_request.encode()).hexdigest(),
            ]
        )
        key = sign(("AWS4" + self.secret_key).encode(), date)
        for part in (REGION, "s3", "aws4_request"):
            key = sign(key, part)
        signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            self.endpoint + path,
            data=body if method in ("PUT", "POST") else None,
            method=method,
            headers={
                "x-amz-date": amz_date,
                "x-amz-content-sha256": payload_hash,
                "Authorization": (
                    f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
                    f"SignedHeaders={signed_headers}, Signature={signature}"
                ),
            },
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return response.read()


def write_round_trip(client: Client) -> None:
    bucket = f"/{PROBE_BUCKET}"
    obj = f"{bucket}/probe"
    try:
        client.call("PUT", bucket)
    except urllib.error.HTTPError as error:
        # Already there from an earlier probe of the same server.
        if error.code != 409:
            raise
    client.call("PUT", obj, PROBE_BODY)
    read = client.call("GET", obj)
    if read != PROBE_BODY:
        raise ValueError(f"read back {len(read)} bytes that differ from the probe object")
    client.call("DELETE", obj)
    client.call("DELETE", bucket)


def main() -> int:
    args = sys.argv[1:]
    write = bool(args) and args[0] == "--write"
    if write:
        args = args[1:]
    if len(args) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, access_key, secret_key = args[:3]
    timeout = float(args[3]) if len(args) == 4 else 5.0
    client = Client(endpoint, access_key, secret_key, timeout)
    step = "ListBuckets"
    try:
        client.call("GET", "/")
        if write:
            step = "write round trip"
            write_round_trip(client)
    except urllib.error.HTTPError as error:
        print(f"s3 probe ({step}): HTTP {error.code}: {error.read()[:300]!r}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"s3 probe ({step}): {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
