#!/usr/bin/env python3
"""Makes the ES256 key, JWKS and bearer token for the JWT scenario of bench/compare.sh.

usage: jwt_setup.py DIR ISSUER AUDIENCE

Writes into DIR:
  es256.key       the private key (PKCS#8 PEM), from `openssl ecparam` + `openssl pkcs8`
  es256.pub.pem   the public key (PEM), for HAProxy's jwt_verify
  jwks.json       the public key as a JWKS (kty EC, crv P-256, kid bench-1), for portcullis
  token.txt       an ES256 JWT (iss, aud, sub, groups [bench], iat, nbf, exp = now + 30 days)

Only python3's standard library and the openssl CLI are used: the JWK's x and y are the last
64 bytes of the DER public key (the uncompressed point 04||x||y), and openssl's DER ECDSA
signature is converted to the raw r||s that JWS wants.
"""

import base64
import json
import os
import subprocess
import sys
import time


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def run(*args, inp=None) -> bytes:
    return subprocess.run(args, input=inp, check=True, capture_output=True).stdout


def der_len(buf: bytes, i: int):
    n = buf[i]
    if n < 0x80:
        return n, i + 1
    k = n & 0x7F
    return int.from_bytes(buf[i + 1:i + 1 + k], "big"), i + 1 + k


def der_sig_to_raw(der: bytes) -> bytes:
    """ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } -> r||s, 32 bytes each."""
    assert der[0] == 0x30, "not a DER SEQUENCE"
    _, i = der_len(der, 1)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02, "not a DER INTEGER"
        n, i = der_len(der, i + 1)
        v = der[i:i + n]
        i += n
        v = v.lstrip(b"\x00")
        assert len(v) <= 32
        out += v.rjust(32, b"\x00")
    return out


def main() -> int:
    d, issuer, audience = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(d, exist_ok=True)
    key, pub = f"{d}/es256.key", f"{d}/es256.pub.pem"
    if not os.path.exists(key):
        sec1 = run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout")
        with open(key, "wb") as f:
            f.write(run("openssl", "pkcs8", "-topk8", "-nocrypt", inp=sec1))
        os.chmod(key, 0o600)
    with open(pub, "wb") as f:
        f.write(run("openssl", "ec", "-in", key, "-pubout"))
    der = run("openssl", "ec", "-in", key, "-pubout", "-outform", "DER")
    point = der[-65:]
    assert point[0] == 0x04, "expected an uncompressed EC point"
    x, y = point[1:33], point[33:65]
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "bench-1",
                      "x": b64url(x), "y": b64url(y)}]}
    with open(f"{d}/jwks.json", "w") as f:
        json.dump(jwks, f, indent=2)

    now = int(time.time())
    header = {"alg": "ES256", "typ": "JWT", "kid": "bench-1"}
    claims = {"iss": issuer, "aud": audience, "sub": "bench-user", "groups": ["bench"],
              "iat": now, "nbf": now - 60, "exp": now + 30 * 24 * 3600}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                     b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig_der = run("openssl", "dgst", "-sha256", "-sign", key, inp=signing_input.encode())
    token = signing_input + "." + b64url(der_sig_to_raw(sig_der))
    with open(f"{d}/token.txt", "w") as f:
        f.write(token + "\n")

    # Check the signature with openssl, going back from raw r||s to DER.
    raw = der_sig_to_raw(sig_der)

    def der_int(v: bytes) -> bytes:
        v = v.lstrip(b"\x00") or b"\x00"
        if v[0] & 0x80:
            v = b"\x00" + v
        return b"\x02" + bytes([len(v)]) + v

    body = der_int(raw[:32]) + der_int(raw[32:])
    with open(f"{d}/sig.der", "wb") as f:
        f.write(b"\x30" + bytes([len(body)]) + body)
    run("openssl", "dgst", "-sha256", "-verify", pub, "-signature", f"{d}/sig.der", inp=signing_input.encode())
    os.remove(f"{d}/sig.der")
    return 0


if __name__ == "__main__":
    sys.exit(main())
