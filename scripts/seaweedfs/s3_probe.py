#!/usr/bin/env python3
"""Readiness probe for an S3 endpoint: a SigV4-signed ListBuckets (stdlib only).

Usage: s3_probe.py ENDPOINT ACCESS_KEY SECRET_KEY [TIMEOUT_SECONDS]

Exits 0 when the endpoint answers ListBuckets with 200 (so authentication and the
metadata path work, not just the socket), 1 otherwise, printing why on stderr.
"""

import datetime
import hashlib
import hmac
import sys
import urllib.error
import urllib.parse
import urllib.request

REGION = "us-east-1"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sign(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def list_buckets(endpoint: str, access_key: str, secret_key: str, timeout: float) -> int:
    host = urllib.parse.urlsplit(endpoint).netloc
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = now.strftime("%Y%m%d")
    canonical_headers = (
        f"host:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{amz_date}\n"
    )
    signed_headers = "host;x-amz-content-sha256;x-amz-date"
    canonical_request = "\n".join(
        ["GET", "/", "", canonical_headers, signed_headers, EMPTY_SHA256]
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
    key = sign(("AWS4" + secret_key).encode(), date)
    for part in (REGION, "s3", "aws4_request"):
        key = sign(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        endpoint.rstrip("/") + "/",
        headers={
            "x-amz-date": amz_date,
            "x-amz-content-sha256": EMPTY_SHA256,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                f"SignedHeaders={signed_headers}, Signature={signature}"
            ),
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status


def main() -> int:
    if len(sys.argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    endpoint, access_key, secret_key = sys.argv[1:4]
    timeout = float(sys.argv[4]) if len(sys.argv) == 5 else 5.0
    try:
        status = list_buckets(endpoint, access_key, secret_key, timeout)
    except urllib.error.HTTPError as error:
        print(f"s3 probe: HTTP {error.code}: {error.read()[:300]!r}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"s3 probe: {error}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"s3 probe: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
