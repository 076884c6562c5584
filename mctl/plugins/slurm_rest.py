"""The Slurm backend's REST path: slurmrestd's API v0.0.38 (Slurm 22.05), JWT authentication.

Chosen with `--scheduler-option api=rest`; the URL comes from `restd_url` or `SLURMRESTD_URL`,
the token from `SLURM_JWT` (`scontrol token` makes one), the user name from `restd_user` (default:
this process's user).
"""

from __future__ import annotations

import getpass
import os
from typing import Any

from mctl.exception import InvalidError

API = "/slurm/v0.0.38"


def parse_gres(text: str) -> dict[str, int]:
    """A node's GRES as Slurm prints it ("gpu:a100:2,gpu:2(S:0)") -> GPUs by type ("" untyped)."""
    gpus: dict[str, int] = {}
    for item in filter(None, text.split(",")):
        parts = item.split("(")[0].split(":")  # gpu:a100:2 or gpu:2
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            gpus[parts[1] if len(parts) == 3 else ""] = int(parts[-1])
    return gpus


class RestError(InvalidError):
    """slurmrestd refused or failed; the message has its own words."""


class SlurmRest:
    def __init__(self, options: dict[str, Any], timeout: float) -> None:
        self.url = (options.get("restd_url") or os.environ.get("SLURMRESTD_URL") or "").rstrip("/")
        if not self.url:
            raise InvalidError("api=rest needs slurmrestd's URL: set SLURMRESTD_URL or "
                               "--scheduler-option restd_url=http://HOST:6820.")
        self.token = os.environ.get("SLURM_JWT")
        if not self.token:
            raise InvalidError("api=rest needs a JWT for slurmrestd: SLURM_JWT is not set; make "
                               "one with `scontrol token` and export SLURM_JWT=... .")
        self.user = options.get("restd_user") or getpass.getuser()
        self.timeout = timeout
        self._session: Any = None

    async def _call(self, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"X-SLURM-USER-NAME": self.user, "X-SLURM-USER-TOKEN": self.token},
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.request(method, self.url + API + path, json=body,
                                             params=params) as resp:
                text = await resp.text()
                if resp.status in (401, 403):
                    raise RestError(f"slurmrestd at {self.url} refused the token (HTTP "
                                    f"{resp.status}); SLURM_JWT is missing, wrong or expired: "
                                    "make a new one with `scontrol token`.")
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    raise RestError(f"slurmrestd {method} {path}: HTTP {resp.status}: "
                                    f"{text[:200]}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RestError(f"Slurm is unreachable: slurmrestd at {self.url} did not answer "
                            f"({exc or type(exc).__name__}). Check SLURMRESTD_URL.") from None
        errors = [e for e in data.get("errors", []) if e.get("error") or e.get("description")]
        if errors:
            raise RestError("slurmrestd: " + "; ".join(
                str(e.get("error") or e.get("description")) for e in errors))
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def nodes(self) -> list[dict[str, Any]]:
        data = await self._call("GET", "/nodes")
        out = []
        for node in data.get("nodes", []):
            out.append({"name": node["name"], "cpus": int(node.get("cpus") or 0),
                        "memory_mb": int(node.get("real_memory") or 0),
                        "gpus": parse_gres(node.get("gres") or "")})
        return out

    async def submit(self, job: dict[str, Any], script: str) -> str:
        data = await self._call("POST", "/job/submit", {"script": script, "job": job})
        return str(data["job_id"])

    async def states(self, job_ids: list[str]) -> dict[str, tuple[str, str, int | None]]:
        """job id -> (state, node, exit code) for the jobs slurmctld still knows."""
        data = await self._call("GET", "/jobs")
        out = {}
        for job in data.get("jobs", []):
            job_id = str(job.get("job_id"))
            if job_id in job_ids:
                out[job_id] = (job.get("job_state", ""), job.get("nodes") or "",
                               job.get("exit_code"))
        return out

    async def running_jobs(self) -> list[tuple[str, str, str, str]]:
        """(job id, state, node, comment) of every job slurmctld still knows."""
        data = await self._call("GET", "/jobs")
        return [(str(j.get("job_id")), j.get("job_state", ""), j.get("nodes") or "",
                 j.get("comment") or "") for j in data.get("jobs", [])]

    async def signal(self, job_id: str, signal: str | None = None) -> None:
        await self._call("DELETE", f"/job/{job_id}", params={"signal": signal} if signal else None)
