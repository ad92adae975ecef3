#!/usr/bin/env python3
"""A status-panel style agent written only against tether's seed-000 routes.

It registers once with an enrollment token (POST /api/v1/agents/register),
keeps the long-lived agent key it gets in a 0600 state file, then long-polls
GET /api/v1/agent/commands/wait, runs each command it receives from a fixed
allow-list and reports the outcome to POST /api/v1/agent/commands/report.
Python 3 standard library only. See README.md.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

DASHBOARD_URL = os.environ.get("DASHBOARD_URL", "http://localhost:5000").rstrip("/")
AGENT_ID = os.environ.get("AGENT_ID") or socket.gethostname()
POLLING_TIMEOUT_SECS = int(os.environ.get("POLLING_TIMEOUT_SECS", "30"))
POLLING_BACKOFF_SECS = int(os.environ.get("POLLING_BACKOFF_SECS", "5"))
COMMAND_TIMEOUT_SECS = int(os.environ.get("COMMAND_TIMEOUT_SECS", "300"))
ENROLL_TOKEN = os.environ.get("TETHER_ENROLL_TOKEN")
STATE_FILE = os.environ.get("AGENT_STATE", "agent-state.json")

# What the agent will run: command name -> argv. Nothing else is ever run,
# and parameters never reach a shell.
COMMANDS = {
    "date": ["date", "-u"],
    "uptime": ["uptime"],
    "hostname": ["hostname"],
}


def log(message, **fields):
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{message} {extra}".rstrip(), file=sys.stderr, flush=True)


class Refused(Exception):
    """The server refused the credentials (401/403): retrying will not help."""


class HttpError(RuntimeError):
    """Any other error answer; `code` is the HTTP status."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def call(method, path, body=None, token=None, timeout=10):
    """One HTTP request; returns (status, parsed JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(DASHBOARD_URL + path, data=data, method=method)
    req.add_header("X-Agent-Id", AGENT_ID)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            raw = res.read()
            return res.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        if e.code in (401, 403):
            raise Refused(f"{method} {path}: {e.code} {raw.decode(errors='replace')}") from None
        raise HttpError(e.code, f"{method} {path}: {e.code} {raw.decode(errors='replace')}") from None


def credentials():
    """The agent key from the state file, registering first if there is none."""
    try:
        with open(STATE_FILE) as f:
            return json.load(f)["token"]
    except FileNotFoundError:
        pass
    if not ENROLL_TOKEN:
        sys.exit(f"not registered yet and TETHER_ENROLL_TOKEN is not set (state file {STATE_FILE})")
    while True:
        try:
            body = {"enroll_token": ENROLL_TOKEN, "hostname": socket.gethostname(), "agent_id": AGENT_ID}
            _, state = call("POST", "/api/v1/agents/register", body)
            break
        except Refused as e:
            sys.exit(f"registration refused: {e}")
        except HttpError as e:
            if e.code != 429 and e.code < 500:
                sys.exit(f"registration refused: {e}")
            log("registration failed, retrying", error=e, backoff_secs=POLLING_BACKOFF_SECS)
        except OSError as e:
            log("registration failed, retrying", error=e, backoff_secs=POLLING_BACKOFF_SECS)
        time.sleep(POLLING_BACKOFF_SECS)
    fd = os.open(STATE_FILE + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(STATE_FILE + ".tmp", STATE_FILE)
    log("registered", agent_id=state["agent_id"], agent_name=AGENT_ID)
    return state["token"]


def execute(cmd):
    """Runs an allowed command; returns the seed's report body."""
    report = {"command_id": cmd["id"], "status": "failed", "result": None, "error": None}
    argv = COMMANDS.get(cmd["name"])
    if argv is None:
        report["error"] = f"unknown command {cmd['name']!r}"
        return report
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECS)
    except subprocess.TimeoutExpired:
        report.update(status="timeout", error=f"timed out after {COMMAND_TIMEOUT_SECS}s")
        return report
    except OSError as e:
        report["error"] = str(e)
        return report
    report["result"] = {"stdout": done.stdout, "stderr": done.stderr, "exit_code": done.returncode}
    if done.returncode == 0:
        report["status"] = "success"
    else:
        report["error"] = f"exit status {done.returncode}"
    return report


def report(body, token):
    """Sends a result until the server has it: network errors, 429 and 5xx
    are retried; any other answer is final."""
    while True:
        try:
            call("POST", "/api/v1/agent/commands/report", body, token=token)
            return
        except HttpError as e:
            if e.code != 429 and e.code < 500:
                log("result refused", command_id=body["command_id"], error=e)
                return
            log("report failed, retrying", error=e, backoff_secs=POLLING_BACKOFF_SECS)
        except OSError as e:
            log("report failed, retrying", error=e, backoff_secs=POLLING_BACKOFF_SECS)
        time.sleep(POLLING_BACKOFF_SECS)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    token = credentials()
    log("long-polling configuration initialized", dashboard_url=DASHBOARD_URL, agent_id=AGENT_ID)
    while True:
        try:
            status, cmd = call(
                "GET",
                f"/api/v1/agent/commands/wait?timeout={POLLING_TIMEOUT_SECS}",
                token=token,
                timeout=POLLING_TIMEOUT_SECS + 5,
            )
            if status == 204:
                continue  # no command within the timeout: poll again at once
            log("command received from dashboard", command_id=cmd["id"], command_name=cmd["name"])
            report(execute(cmd), token)
            log("command execution and reporting completed", command_id=cmd["id"])
        except Refused as e:
            sys.exit(f"credentials refused, stopping: {e}")
        except (OSError, RuntimeError, ValueError) as e:
            # Only errors back off; a timeout without a command does not.
            log("polling error, applying backoff", error=e, backoff_secs=POLLING_BACKOFF_SECS)
            time.sleep(POLLING_BACKOFF_SECS)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
