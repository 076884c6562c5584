"""Nomad's HTTP API, as the nomad backend and `mctl nomad` call it.

python-nomad (the `mctl[nomad]` extra) makes the calls it has a method for; it is synchronous
(requests), so each call runs in a thread. What it lacks or gets wrong for mctl is handled here:

- it has no scale method: its generic `job.request(<id>, "scale", ...)` posts the body;
- its log stream returns the whole response as text, so following a log cannot work: logs are read
  with aiohttp, as a stream of `api.StreamFrame` objects (`stream_logs`);
- it does not verify TLS unless told to (`verify=False` is its default): mctl always passes
  NOMAD_CACERT, or True for the system's CAs;
- it sends the namespace of `/v1/var/...` calls only when given one per call: mctl always gives it.

Every body goes on the wire exactly as mctl built it (python-nomad passes `json=` through), so
the contract checks of those bodies (tools/nomad-jobcheck) hold for what is sent;
tests/test_nomad_requests.py records the requests on the wire and checks them again.

Connection settings, as Nomad's own CLI reads them: NOMAD_ADDR (default http://127.0.0.1:4646),
NOMAD_TOKEN, NOMAD_NAMESPACE, NOMAD_REGION, NOMAD_CACERT, NOMAD_CLIENT_CERT/NOMAD_CLIENT_KEY, or
the backend options address, token_file, cacert. `mctl nomad force|logs` fill options that neither
`-o` nor NOMAD_* set from the active profile (`mctl profile nomad`, mctl/cli/profile_nomad.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mctl.exception import InvalidError

if TYPE_CHECKING:
    from mctl.plugins.nomad_render import NomadOptions

TASK = "worker"


class NomadError(InvalidError):
    """Nomad refused a request or could not be reached; the message says what to set."""


@dataclass(frozen=True)
class Connection:
    address: str
    token: str | None
    namespace: str
    region: str
    cacert: str | None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_settings(cls, options: dict[str, Any], render: NomadOptions,
                      explicit: set[str]) -> Connection:
        token = os.environ.get("NOMAD_TOKEN") or None
        if options.get("token_file"):
            try:
                with open(options["token_file"]) as fh:
                    token = fh.read().strip()
            except OSError as exc:
                raise NomadError(f"The nomad option token_file={options['token_file']} cannot "
                                 f"be read ({exc.strerror}); point it at a file holding a Nomad "
                                 "ACL token, or set NOMAD_TOKEN.") from None
        return cls(
            address=(options.get("address") or os.environ.get("NOMAD_ADDR")
                     or "http://127.0.0.1:4646").rstrip("/"),
            token=token,
            namespace=render.namespace if "namespace" in explicit
            else os.environ.get("NOMAD_NAMESPACE") or render.namespace,
            region=render.region if "region" in explicit
            else os.environ.get("NOMAD_REGION") or render.region,
            cacert=options.get("cacert") or os.environ.get("NOMAD_CACERT") or None,
            client_cert=os.environ.get("NOMAD_CLIENT_CERT") or None,
            client_key=os.environ.get("NOMAD_CLIENT_KEY") or None)


def var_path(job_id: str) -> str:
    """The Nomad Variable a job's own tasks may read (`nomadVar` in their templates)."""
    return f"nomad/jobs/{job_id}"


def logs_request(alloc_id: str, task: str = TASK, kind: str = "stdout", follow: bool = False,
                 tail_bytes: int = 0) -> tuple[str, dict[str, str]]:
    """`GET /v1/client/fs/logs/:alloc_id`: a stream of `api.StreamFrame` objects, from
    `tail_bytes` before the end of the task's log (`origin=end`); `follow` keeps it open."""
    if kind not in ("stdout", "stderr"):
        raise InvalidError(f"Log type {kind!r} is not stdout or stderr.")
    return (f"/v1/client/fs/logs/{quote(alloc_id, safe='')}",
            {"task": task, "type": kind, "follow": "true" if follow else "false",
             "origin": "end", "offset": str(max(0, tail_bytes)), "plain": "false"})


class FrameDecoder:
    """Nomad's log stream: JSON `StreamFrame` objects one after another (`{}` heartbeats
    between), each `Data` base64; `feed` returns the log bytes of the frames complete so far."""

    def __init__(self) -> None:
        import codecs
        import json

        self._text = ""
        self._json = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # a chunk may cut a character

    def feed(self, chunk: bytes) -> list[bytes]:
        import base64

        self._text += self._utf8.decode(chunk)
        out = []
        while True:
            text = self._text.lstrip()
            if not text:
                self._text = ""
                return out
            try:
                frame, end = self._json.raw_decode(text)
            except ValueError:  # an incomplete frame: wait for more
                self._text = text
                return out
            self._text = text[end:]
            if isinstance(frame, dict) and frame.get("Data"):
                out.append(base64.b64decode(frame["Data"]))


class NomadAPI:
    """The calls mctl makes, each answering Nomad's JSON or raising a NomadError that says what
    to do. `missing_ok` calls answer None for a 404."""

    def __init__(self, conn: Connection, timeout: float = 15.0) -> None:
        self.conn = conn
        self.timeout = timeout
        self._clients: dict[str, Any] = {}  # namespace -> python-nomad client
        self._requests: Any = None  # the one requests.Session they share
        self._session: Any = None  # aiohttp, for log streams
        self._ws_session: Any = None  # aiohttp, for exec WebSockets

    def _client(self, namespace: str | None) -> Any:
        """python-nomad's client for a namespace (a function may run in its own: python-nomad
        takes the namespace of most calls from its client, not per call)."""
        namespace = namespace or self.conn.namespace
        if namespace not in self._clients:
            try:
                import nomad
            except ImportError:
                raise NomadError("The nomad scheduler needs python-nomad; install mctl with "
                                 "its nomad extra: pip install 'mctl[nomad]'.") from None
            import requests

            if self._requests is None:
                self._requests = requests.Session()  # one connection pool for every call
            cert = (self.conn.client_cert, self.conn.client_key) if self.conn.client_cert else ()
            self._clients[namespace] = nomad.Nomad(
                address=self.conn.address, token=self.conn.token, namespace=namespace,
                region=self.conn.region, timeout=self.timeout,  # type: ignore[arg-type]
                verify=self.conn.cacert or True,  # type: ignore[arg-type]
                cert=cert, session=self._requests)
        return self._clients[namespace]

    async def _call(self, what: str, call: Callable[[Any], Any], missing_ok: bool = False,
                    namespace: str | None = None) -> Any:
        from nomad.api import exceptions

        client = self._client(namespace)
        try:
            return await asyncio.to_thread(call, client)
        except exceptions.URLNotFoundNomadException as exc:
            if missing_ok:
                return None
            raise NomadError(f"Nomad answered 404 to {what}: {_text(exc)}") from None
        except exceptions.URLNotAuthorizedNomadException as exc:
            raise NomadError(self._denied(what, _text(exc))) from None
        except exceptions.BaseNomadException as exc:
            response = exc.nomad_resp
            if hasattr(response, "status_code"):
                raise NomadError(f"Nomad answered {response.status_code} to {what}: "
                                 f"{_text(exc)}") from None
            raise self._unreachable(response) from None
        except ValueError as exc:  # an answer that is not JSON: not a Nomad agent
            raise NomadError(f"{self.conn.address} answered {what} with something that is not "
                             f"Nomad's JSON ({exc}); check NOMAD_ADDR.") from None

    def _unreachable(self, exc: Any) -> NomadError:
        reason = str(getattr(exc, "strerror", None) or "").lower()
        if not reason:
            text = str(exc)
            reason = ("no answer within " f"{self.timeout:g}s" if "timed out" in text.lower()
                      or not text else "connection refused" if "refused" in text.lower()
                      else text[-200:])
        return NomadError(
            f"Nomad is unreachable at {self.conn.address} ({reason}). Set NOMAD_ADDR (or the "
            "nomad option address=URL) to a Nomad agent's HTTP address, e.g. "
            "http://nomad.service.consul:4646.")

    def _denied(self, what: str, text: str) -> str:
        if not self.conn.token:
            return (f"Nomad refused {what}: permission denied, and no ACL token was sent. Set "
                    "NOMAD_TOKEN (or --scheduler-option token_file=PATH) to a token allowed to "
                    f"submit, scale and read jobs in namespace {self.conn.namespace}.")
        return (f"Nomad refused {what}: permission denied ({text.strip()[:200]}). The token in "
                "NOMAD_TOKEN needs the submit-job, scale-job, read-job and variables write "
                f"capabilities in namespace {self.conn.namespace}.")

    # --- the calls -----------------------------------------------------------------------------
    async def leader(self) -> Any:
        return await self._call("GET /v1/status/leader", lambda n: n.status.leader.get_leader())

    # Each takes the job's namespace (`ns`, default the connection's).
    async def register(self, job_id: str, body: dict[str, Any], ns: str | None = None) -> Any:
        """`POST /v1/job/:id` with an `api.JobRegisterRequest`."""
        return await self._call(f"POST /v1/job/{job_id}",
                                lambda n: n.job.register_job(job_id, body), namespace=ns)

    async def job(self, job_id: str, ns: str | None = None) -> Any:
        return await self._call(f"GET /v1/job/{job_id}", lambda n: n.job.get_job(job_id),
                                missing_ok=True, namespace=ns)

    async def versions(self, job_id: str, ns: str | None = None) -> Any:
        return await self._call(f"GET /v1/job/{job_id}/versions",
                                lambda n: n.job.get_versions(job_id), missing_ok=True,
                                namespace=ns)

    async def revert(self, job_id: str, version: int, prior: int, ns: str | None = None) -> Any:
        """`POST /v1/job/:id/revert`; python-nomad sends `revert_body(job_id, version, prior)`."""
        return await self._call(f"POST /v1/job/{job_id}/revert",
                                lambda n: n.job.revert_job(job_id, version, prior), namespace=ns)

    async def scale(self, job_id: str, body: dict[str, Any], ns: str | None = None) -> Any:
        """`POST /v1/job/:id/scale` with an `api.ScalingRequest` (python-nomad has no method)."""
        return await self._call(
            f"POST /v1/job/{job_id}/scale",
            lambda n: n.job.request(job_id, "scale", json=body, method="post").json(),
            namespace=ns)

    async def deregister(self, job_id: str, ns: str | None = None) -> Any:
        """`DELETE /v1/job/:id`: Nomad stops the job (its versions stay, for a later revert)."""
        return await self._call(f"DELETE /v1/job/{job_id}",
                                lambda n: n.job.deregister_job(job_id), missing_ok=True,
                                namespace=ns)

    async def purge(self, job_id: str, ns: str | None = None) -> Any:
        """`DELETE /v1/job/:id?purge=true`: stop the job and remove it now (a sandbox's job: no
        version of it is ever run again)."""
        return await self._call(f"DELETE /v1/job/{job_id}?purge=true",
                                lambda n: n.job.deregister_job(job_id, purge=True),
                                missing_ok=True, namespace=ns)

    async def jobs(self, prefix: str, ns: str | None = None) -> Any:
        """`GET /v1/jobs?prefix=...&meta=true`: `api.JobListStub`s, with each job's meta."""
        return await self._call(f"GET /v1/jobs?prefix={prefix}",
                                lambda n: n.jobs.get_jobs(prefix=prefix, meta=True),
                                namespace=ns)

    async def evaluation(self, eval_id: str, ns: str | None = None) -> Any:
        """`GET /v1/evaluation/:id`: an `api.Evaluation` (`FailedTGAllocs` says why a group
        could not be placed)."""
        namespace = ns or self.conn.namespace
        return await self._call(f"GET /v1/evaluation/{eval_id}", lambda n: n.evaluation.request(
            eval_id, method="get", params={"namespace": namespace}).json(), missing_ok=True,
            namespace=ns)

    async def allocation(self, alloc_id: str, ns: str | None = None) -> Any:
        """`GET /v1/allocation/:id`: an `api.Allocation`."""
        return await self._call(f"GET /v1/allocation/{alloc_id}",
                                lambda n: n.allocation.get_allocation(alloc_id), missing_ok=True,
                                namespace=ns)

    async def allocations(self, job_id: str, ns: str | None = None) -> Any:
        return await self._call(f"GET /v1/job/{job_id}/allocations",
                                lambda n: n.job.get_allocations(job_id), missing_ok=True,
                                namespace=ns)

    async def force(self, job_id: str, ns: str | None = None) -> Any:
        """`POST /v1/job/:id/periodic/force`: Nomad launches the periodic job now."""
        return await self._call(f"POST /v1/job/{job_id}/periodic/force",
                                lambda n: n.job.periodic_job(job_id), missing_ok=True,
                                namespace=ns)

    async def put_variable(self, job_id: str, body: dict[str, Any],
                           ns: str | None = None) -> Any:
        """`PUT /v1/var/nomad/jobs/:id` with an `api.Variable`, in the job's namespace (where
        the job's template reads it)."""
        path, ns = var_path(job_id), ns or self.conn.namespace
        return await self._call(f"PUT /v1/var/{path}", lambda n: n.variable.create_variable(
            path, body, namespace=ns), namespace=ns)

    async def delete_variable(self, job_id: str, ns: str | None = None) -> Any:
        path, ns = var_path(job_id), ns or self.conn.namespace

        def delete(n: Any) -> None:
            n.variable.delete_variable(path, namespace=ns)

        return await self._call(f"DELETE /v1/var/{path}", delete, missing_ok=True, namespace=ns)

    # --- logs (aiohttp: python-nomad cannot follow a stream) -----------------------------------
    async def _http(self, streams: bool = False) -> Any:
        """The aiohttp session for log streams; with `streams`, the one for exec WebSockets
        (no total time limit: a command may run for hours)."""
        import aiohttp

        if (self._ws_session if streams else self._session) is None:
            ssl_context: Any = None
            if self.conn.cacert or self.conn.client_cert:
                import ssl

                ssl_context = ssl.create_default_context(cafile=self.conn.cacert)
                if self.conn.client_cert:
                    ssl_context.load_cert_chain(self.conn.client_cert, self.conn.client_key)
            headers = {"X-Nomad-Token": self.conn.token} if self.conn.token else {}
            session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(
                    total=None if streams else self.timeout, connect=self.timeout),
                connector=aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None)
            if streams:
                self._ws_session = session
            else:
                self._session = session
        return self._ws_session if streams else self._session

    async def stream_logs(self, alloc_id: str, task: str = TASK, kind: str = "stdout",
                          follow: bool = False, tail_bytes: int = 0,
                          ns: str | None = None) -> AsyncIterator[bytes]:
        """The task's log through Nomad's client fs API (the agent forwards it from the node):
        its last `tail_bytes`, then, with `follow`, what it writes until the allocation ends."""
        import aiohttp

        path, params = logs_request(alloc_id, task, kind, follow, tail_bytes)
        session = await self._http()
        query = {"namespace": ns or self.conn.namespace, "region": self.conn.region, **params}
        frames = FrameDecoder()
        no_limit = aiohttp.ClientTimeout(total=None, connect=self.timeout)
        try:
            async with session.get(f"{self.conn.address}{path}", params=query,
                                   timeout=no_limit if follow else session.timeout) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    raise NomadError(self._denied(f"GET {path}", text) if resp.status == 403
                                     else f"Nomad answered {resp.status} to GET {path}: "
                                     f"{text.strip()[:500]}")
                async for chunk in resp.content.iter_any():
                    for data in frames.feed(chunk):
                        yield data
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    async def read_log(self, alloc_id: str, task: str, kind: str = "stdout",
                       ns: str | None = None, follow: bool = False) -> AsyncIterator[bytes]:
        """A task's whole log, from its start, as plain bytes
        (`GET /v1/client/fs/logs/:alloc?task=&type=&plain=true&origin=start`); with `follow`
        until the task ends."""
        import aiohttp

        if kind not in ("stdout", "stderr"):
            raise InvalidError(f"Log type {kind!r} is not stdout or stderr.")
        path = f"/v1/client/fs/logs/{quote(alloc_id, safe='')}"
        query = {"namespace": ns or self.conn.namespace, "region": self.conn.region,
                 "task": task, "type": kind, "plain": "true", "origin": "start", "offset": "0",
                 "follow": "true" if follow else "false"}
        session = await self._http()
        no_limit = aiohttp.ClientTimeout(total=None, connect=self.timeout)
        try:
            async with session.get(f"{self.conn.address}{path}", params=query,
                                   timeout=no_limit if follow else session.timeout) as resp:
                if resp.status >= 400:
                    text = await resp.text()
                    if resp.status == 404:
                        raise LookupError(text.strip()[:300])
                    raise NomadError(self._denied(f"GET {path}", text) if resp.status == 403
                                     else f"Nomad answered {resp.status} to GET {path}: "
                                     f"{text.strip()[:500]}")
                async for chunk in resp.content.iter_any():
                    yield chunk
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    async def exec_socket(self, path: str, ns: str | None = None) -> Any:
        """Nomad's alloc exec WebSocket at `path` (`sandbox_nomad.exec_path`), with the ACL
        token in X-Nomad-Token; an aiohttp ClientWebSocketResponse, frames as text."""
        import aiohttp

        session = await self._http(streams=True)
        sep = "&" if "?" in path else "?"
        url = (self.conn.address + path + sep + "namespace=" + quote(ns or self.conn.namespace)
               + "&region=" + quote(self.conn.region))
        headers = {"X-Nomad-Token": self.conn.token} if self.conn.token else {}
        try:
            return await session.ws_connect(
                url, headers=headers, heartbeat=30, max_msg_size=16 << 20,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 403:
                raise NomadError(self._denied(f"GET {path.split('?')[0]}", exc.message)
                                 + " (alloc exec needs the alloc-exec capability)") from None
            raise NomadError(f"Nomad answered {exc.status} to the exec WebSocket "
                             f"{path.split('?')[0]}: {exc.message}") from None
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    async def close(self) -> None:
        for session in (self._session, self._ws_session):
            if session is not None:
                await session.close()
        self._session = self._ws_session = None
        if self._requests is not None:
            self._requests.close()
            self._requests = None
        self._clients.clear()


def _text(exc: Any) -> str:
    response = getattr(exc, "nomad_resp", None)
    return str(getattr(response, "text", "") or exc).strip()[:500]
