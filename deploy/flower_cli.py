"""The `flwr` CLI as a testbed drives it: the connection it reads from `$FLWR_HOME/config.toml`,
the SuperNode registration that `flower-superlink --enable-supernode-auth` requires before a
SuperNode may connect, and the reason in a refused SuperNode's log.

Flower 1.41's CLI takes a connection by name from `[superlink.NAME]` in `$FLWR_HOME/config.toml`:
`address` (the SuperLink's HTTP API, host:port) and either `insecure = true` or
`root-certificates` (an absolute path to the CA that signed the SuperLink's certificate).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path


def write_flwr_connection(flwr_home: Path, address: str, *, root_certificates: Path | None,
                          name: str = "fedfill") -> Path:
    """Write `flwr_home/config.toml` with the one connection `name` (also the default) to the
    SuperLink at `address`: over TLS checked against `root_certificates`, or plaintext when
    None. Returns the file's path. The file is the run's own, so it is replaced whole."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    if root_certificates is None:
        security = "insecure = true\n"
    else:
        security = f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}\n"
    path = flwr_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = {json.dumps(address)}\n'
                    + security)
    return path


class AlreadyRegistered(RuntimeError):
    """The SuperLink already holds this public key (its database outlived a testbed restart):
    the node may connect as it is; its id is the one the first registration returned."""


def _flwr(args: list[str], flwr_home: Path, timeout_s: float) -> subprocess.CompletedProcess:
    from deploy.local import flower_environment

    return subprocess.run(["flwr", *args], check=False, env=flower_environment(flwr_home), cwd=flwr_home,
                          capture_output=True, text=True, timeout=timeout_s)


def _json_reply(result: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object `--format json` prints on stdout, or an error saying why there is none.

    With `--format json` the CLI exits 0 even when the request failed: `success` tells."""
    try:
        reply = json.loads(result.stdout)
    except json.JSONDecodeError:
        reply = None
    if result.returncode != 0 or not isinstance(reply, dict) or not reply.get("success", False):
        detail = (reply or {}).get("error-message") if isinstance(reply, dict) else None
        raise RuntimeError(f"{what} failed (exit {result.returncode}): "
                           f"{detail or (result.stdout + result.stderr).strip()[-2000:]}")
    return reply


def register_supernode(public_key: Path, flwr_home: Path, connection: str = "fedfill", *,
                       timeout_s: float = 60.0) -> int:
    """Register a SuperNode's public key (an OpenSSH ECDSA line, see deploy/pki.py) with the
    SuperLink of `connection` through `flwr supernode register`; returns the node id the
    SuperLink assigned. The SuperNode that holds the private key may then connect.
    Raises AlreadyRegistered when the SuperLink has the key already (Flower's error 23)."""
    result = _flwr(["supernode", "register", str(Path(public_key).resolve()), connection, "--format", "json"],
                   flwr_home, timeout_s)
    try:
        reply = _json_reply(result, f"flwr supernode register {public_key}")
    except RuntimeError as err:
        if "Public key already in use" in str(err):
            raise AlreadyRegistered(str(err)) from None
        raise
    return int(reply["node-id"])


def list_supernodes(flwr_home: Path, connection: str = "fedfill", *, timeout_s: float = 60.0) -> list[dict]:
    """The SuperNodes the SuperLink of `connection` knows (`flwr supernode list`): one dict per
    node, with at least `node-id` and `status` (e.g. "registered", "online", "offline")."""
    result = _flwr(["supernode", "list", connection, "--format", "json"], flwr_home, timeout_s)
    return list(_json_reply(result, "flwr supernode list").get("nodes", []))


def active_runs(flwr_home: Path, connection: str = "fedfill", *, timeout_s: float = 60.0) -> list[int]:
    """The ids of the runs of the SuperLink of `connection` that have not finished (`flwr ls`)."""
    runs = _json_reply(_flwr(["ls", connection, "--format", "json"], flwr_home, timeout_s), "flwr ls").get("runs", [])
    return [int(run["run-id"]) for run in runs if not str(run.get("status", "")).startswith("finished")]


def stop_active_runs(flwr_home: Path, connection: str = "fedfill", *, timeout_s: float = 60.0) -> list[int]:
    """Stop every run of the SuperLink of `connection` that has not finished (`flwr stop`): a
    driver that was killed leaves its ServerApp running on the SuperLink, and a resumed run
    must not race it. Returns the ids it stopped."""
    stopped = active_runs(flwr_home, connection, timeout_s=timeout_s)
    for run_id in stopped:
        _json_reply(_flwr(["stop", str(run_id), connection, "--format", "json"], flwr_home, timeout_s),
                    f"flwr stop {run_id}")
    return stopped


# A refused SuperNode exits with status 1 and logs Flower's "Exit Code: 305" followed by the
# SuperLink's reason, e.g. "[code: 2004] Failed to activate SuperNode." (flwr.supercore.error).
REFUSALS = {2001: "no registered key: the SuperLink takes only SuperNodes registered with the CLI",
            2004: "its public key is not registered with the SuperLink"}


def supernode_refusal(log: str) -> int | None:
    """The SuperLink's error code in a SuperNode's log when it was refused at connection
    (2001: no key, 2004: unregistered key; see REFUSALS), else None. The process's exit
    status does not carry it: Flower exits 1 for every error."""
    match = re.search(r"Exit Code: 305\s*\nFailed to initialize the connection to the SuperLink\.\s*\n"
                      r"\[code: (\d+)\]", log)
    return int(match.group(1)) if match else None
