"""A minimal registry token service (Docker's token authentication) for scripts/images-dev.

    python3 images-dev-token.py PORT KEY_PEM CERT_PEM ISSUER SERVICE USER PASSWORD

`GET /token?service=...&scope=repository:NAME:pull,push` with Basic credentials answers
`{"token": JWT}` (RS256, signed with `openssl dgst`, the certificate in the `x5c` header so the
registry verifies it against its `rootcertbundle`); wrong or missing credentials answer 401.
Standard library and the openssl command only, so it runs on the system Python.
"""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import sys
import time
import urllib.parse
import uuid

PORT, KEY, CERT, ISSUER, SERVICE, USER, PASSWORD = sys.argv[1:8]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der() -> bytes:
    pem = open(CERT).read()
    body = "".join(line for line in pem.splitlines() if "CERTIFICATE" not in line)
    return base64.b64decode(body)


def sign(payload: dict) -> str:
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der()).decode()]}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", KEY],
                               input=signing_input.encode(), capture_output=True,
                               check=True).stdout
    return f"{signing_input}.{b64url(signature)}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            ok = (user, password) == (USER, PASSWORD)
        if url.path != "/token" or not ok:
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]}')
            return
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            if kind == "repository":
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = sign({"iss": ISSUER, "sub": USER, "aud": query.get("service", [SERVICE])[0],
                      "exp": now + 600, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                      "access": access})
        body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(PORT)), Handler).serve_forever()
