"""The `registry` part of image building: resolve a `from_registry` tag to a digest over the
registry HTTP API v2, anonymously or with credentials (basic, or a bearer token from the registry's
token service), and check whether a registry already holds a tag.

Plain HTTP is used for loopback registries and those in `MCTL_INSECURE_REGISTRIES` (comma
separated host:port); HTTPS, verified with the host's CA bundle, for the rest.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from mctl.exception import InvalidError

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


class RegistryAuthError(InvalidError):
    """The registry refused the credentials, or wants some and none were given."""


@dataclass(frozen=True)
class Reference:
    registry: str      # host[:port]
    repository: str    # e.g. "library/python"
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> str:
        return f"{self.registry}/{self.repository}@{self.digest}"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest
                                                        else f":{self.tag}")


def parse(ref: str) -> Reference:
    """`host:port/name:tag` or `name@sha256:...`; a name without a registry host is refused,
    since no public registry is a default here."""
    name, digest = (ref.split("@", 1) + [None])[:2] if "@" in ref else (ref, None)
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        raise InvalidError(f"Image reference {ref!r} names no registry; write it as "
                           "host[:port]/name:tag (no public registry is assumed).")
    return Reference(first, rest, tag or (None if digest else "latest"), digest)


def insecure(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    allowed = {r.strip() for r in os.environ.get("MCTL_INSECURE_REGISTRIES", "").split(",")}
    return host in ("localhost", "127.0.0.1", "[::1]") or registry in allowed


def _base(registry: str) -> str:
    return ("http://" if insecure(registry) else "https://") + registry


def _open(req: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
    import ssl

    from mctl.core.images import host_ca_bundle

    ctx = ssl.create_default_context(cafile=host_ca_bundle())
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise InvalidError(f"Could not reach registry {req.full_url.split('/v2/')[0]} ({exc}); "
                           "check the address, and that the registry runs.") from None


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, params = header.partition(" ")
    fields = {}
    for part in params.split(","):
        key, _, value = part.strip().partition("=")
        if key:
            fields[key] = value.strip('"')
    return scheme.lower(), fields


def _bearer_token(fields: dict[str, str], creds: tuple[str, str] | None, registry: str,
                  repository: str) -> str:
    query = {k: v for k, v in {"service": fields.get("service"),
                               "scope": fields.get("scope") or f"repository:{repository}:pull"
                               }.items() if v}
    req = urllib.request.Request(fields["realm"] + "?" + urllib.parse.urlencode(query))
    if creds:
        req.add_header("Authorization", _basic(creds))
    status, _, body = _open(req)
    if status in (401, 403):
        raise _refused(registry, creds)
    if status != 200:
        raise InvalidError(f"The token service of registry {registry} answered HTTP {status}.")
    data = json.loads(body)
    return data.get("token") or data["access_token"]


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _refused(registry: str, creds: tuple[str, str] | None) -> RegistryAuthError:
    if creds:
        return RegistryAuthError(f"Registry {registry} refused the credentials for user "
                                 f"{creds[0]!r} (invalid username or password); fix the secret's "
                                 "REGISTRY_USERNAME and REGISTRY_PASSWORD.")
    return RegistryAuthError(f"Registry {registry} requires authentication; pass "
                             "secret=mctl.Secret.from_name(...) holding REGISTRY_USERNAME and "
                             "REGISTRY_PASSWORD.")


def manifest_digest(ref: Reference, creds: tuple[str, str] | None = None) -> str | None:
    """The digest the registry gives `ref` (HEAD on its manifest), None if it has no such tag."""
    url = f"{_base(ref.registry)}/v2/{ref.repository}/manifests/{ref.digest or ref.tag}"
    headers = {"Accept": MANIFEST_TYPES}
    status, resp_headers, _ = _open(urllib.request.Request(url, method="HEAD", headers=headers))
    if status == 401:
        scheme, fields = _challenge(resp_headers.get("WWW-Authenticate")
                                    or resp_headers.get("Www-Authenticate", ""))
        if scheme == "bearer":
            headers["Authorization"] = "Bearer " + _bearer_token(fields, creds, ref.registry,
                                                                 ref.repository)
        elif creds:
            headers["Authorization"] = _basic(creds)
        else:
            raise _refused(ref.registry, None)
        status, resp_headers, _ = _open(urllib.request.Request(url, method="HEAD",
                                                               headers=headers))
        if status in (401, 403):
            raise _refused(ref.registry, creds)
    if status == 404:
        return None
    if status != 200:
        raise InvalidError(f"Registry {ref.registry} answered HTTP {status} for {ref}.")
    digest = resp_headers.get("Docker-Content-Digest") or resp_headers.get("docker-content-digest")
    return digest or ref.digest


def resolve(tag: str, creds: tuple[str, str] | None = None) -> Reference:
    """`tag` pinned to its digest; an unknown tag is an error that names it."""
    ref = parse(tag)
    digest = manifest_digest(ref, creds)
    if digest is None:
        raise InvalidError(f"Registry {ref.registry} has no image {ref}; check the name and tag "
                           "(push it first if it is yours).")
    return Reference(ref.registry, ref.repository, ref.tag, digest)
