#!/usr/bin/env python3
"""Checks deploy/nats/rowsmith-auth.conf against a real nats-server, without building Rust.

This is not part of the test suite. It records what was checked and how:

    python3 -m venv /tmp/natspy && /tmp/natspy/bin/pip install nats-py bcrypt
    /tmp/natspy/bin/python deploy/nats/probe.py [--nats-server PATH] [-v]

It starts nats-server with the config on a free loopback port and a temporary store
(`nats-server -c rowsmith-auth.conf -a 127.0.0.1 -p PORT -sd DIR -js`). The passwords
come from the environment, as the config expects. The admin password is given as a
quoted bcrypt hash when the `bcrypt` module is installed. The probe then talks to the
server the way the Rust code does. Each call below sends the subject and the JSON that
async-nats 0.51 sends for the call named in the comment, taken from reading its source:

  (a) every user runs ensure_topology like shared/bus/src/lib.rs (STREAM.UPDATE, and
      STREAM.CREATE on 404, for ROWSMITH_WORK and ROWSMITH_EVENTS; STREAM.INFO of
      KV_rowsmith-jobs, and on 404 $JS.API.INFO then STREAM.CREATE);
  (b) one job's path: cli submits; each service creates its durable, pulls, reads and
      writes KV records with compare-and-set, publishes its output and an event, then
      acks, NAKs with a delay or terminates; cli reads status, lists keys (ordered push
      consumer), reads events (ordered pull consumer) and cancels;
  (c) what must be refused: foreign subjects, foreign durables and acks, foreign KV
      keys, stream deletion, other inboxes, no credentials, a wrong password, and the
      default _INBOX prefix;
  (d) the strict variant (the "# topology" lines removed): admin creates the topology,
      the services start with read-only checks, and a stream update is refused.

It exits 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import nats
    from nats import errors as nats_errors
except ImportError:  # pragma: no cover
    sys.exit("nats-py is missing: python3 -m venv /tmp/natspy && /tmp/natspy/bin/pip install nats-py")

HERE = Path(__file__).resolve().parent
CONF = HERE / "rowsmith-auth.conf"
REPO = HERE.parent.parent

SERVICES = {
    # user: (durable, filter subject, outputs)
    "ingest": ("ingest", "rowsmith.jobs.submit", ["rowsmith.shards.ready"]),
    "submitter": ("submitter", "rowsmith.shards.ready", ["rowsmith.batches.submitted", "rowsmith.batches.ended"]),
    "poller": ("poller", "rowsmith.batches.submitted", ["rowsmith.batches.ended", "rowsmith.shards.ready"]),
    "merger": ("merger", "rowsmith.batches.ended", ["rowsmith.shards.ready"]),
}
USERS = list(SERVICES) + ["cli", "admin"]
WORK_SUBJECTS = ["rowsmith.jobs.submit", "rowsmith.shards.ready", "rowsmith.batches.submitted", "rowsmith.batches.ended"]
NS = 1_000_000_000

# The stream configurations of shared/bus/src/lib.rs ensure_topology.
WORK_STREAM = {
    "name": "ROWSMITH_WORK",
    "description": "rowsmith work: jobs, shards, batches",
    "subjects": WORK_SUBJECTS,
    "retention": "workqueue",
    "storage": "file",
    "duplicate_window": 600 * NS,
    "num_replicas": 1,
}
EVENTS_STREAM = {
    "name": "ROWSMITH_EVENTS",
    "description": "rowsmith job events",
    "subjects": ["rowsmith.events.>"],
    "retention": "limits",
    "storage": "file",
    "max_age": 7 * 24 * 3600 * NS,
    "duplicate_window": 120 * NS,
    "num_replicas": 1,
}
# kv::Config { bucket, description, history: 5, storage: File } through async-nats'
# kv_to_stream_config.
KV_STREAM = {
    "name": "KV_rowsmith-jobs",
    "description": "rowsmith job and shard records",
    "subjects": ["$KV.rowsmith-jobs.>"],
    "max_msgs_per_subject": 5,
    "storage": "file",
    "allow_rollup_hdrs": True,
    "deny_delete": True,
    "deny_purge": False,
    "allow_direct": True,
    "discard": "new",
    "num_replicas": 1,
}


# --------------------------------------------------------------------------- results

class Results:
    def __init__(self, verbose: bool) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.verbose = verbose
        self.section = ""

    def begin(self, title: str) -> None:
        self.section = title
        print(f"\n== {title}")

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok    {what}" + (f"  ({detail})" if detail and self.verbose else ""))
        else:
            self.failed.append(f"[{self.section}] {what}: {detail}")
            print(f"  FAIL  {what}  {detail}")
        return ok


R: Results


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_server(given: str | None) -> str:
    for candidate in (given, os.environ.get("ROWSMITH_NATS_SERVER"), str(REPO / ".tools/bin/nats-server"),
                      shutil.which("nats-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("nats-server not found: run scripts/bootstrap or pass --nats-server")


class Server:
    def __init__(self, binary: str, conf: Path, env: dict[str, str]) -> None:
        self.binary, self.conf, self.env = binary, conf, env
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="rowsmith-nats-probe-")
        self.log = Path(self.store) / "server.log"
        self.proc: subprocess.Popen | None = None

    def test_config(self) -> tuple[int, str]:
        out = subprocess.run([self.binary, "-c", str(self.conf), "-t"], env=self.env,
                             capture_output=True, text=True)
        return out.returncode, (out.stdout + out.stderr).strip()

    def start(self) -> None:
        cmd = [self.binary, "-c", str(self.conf), "-a", "127.0.0.1", "-p", str(self.port),
               "-sd", self.store, "-js", "-l", str(self.log)]
        self.proc = subprocess.Popen(cmd, env=self.env)
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    sys.exit(f"nats-server exited: {self.log.read_text() if self.log.exists() else ''}")
                time.sleep(0.1)
        sys.exit("nats-server did not start within 15 s")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.store, ignore_errors=True)


def make_passwords() -> tuple[dict[str, str], dict[str, str], str]:
    """Plain passwords for clients, the env for the server, and how admin's is given."""
    plain = {u: "p" + secrets.token_hex(16) for u in USERS}
    env = {f"{u.upper()}_PASSWORD": plain[u] for u in USERS}
    how = "plain"
    try:
        import bcrypt  # type: ignore

        hashed = bcrypt.hashpw(plain["admin"].encode(), bcrypt.gensalt(11)).decode()
        env["ADMIN_PASSWORD"] = f'"{hashed}"'  # quoted: `$2b$…` would read as a variable
        how = "bcrypt hash"
    except ImportError:
        pass
    return plain, env, how


# --------------------------------------------------------------------------- client

class Conn:
    """One NATS connection as `user`, with the inbox prefix the config gives it."""

    def __init__(self, user: str, password: str, url: str, inbox_prefix: str | None = "default") -> None:
        self.user, self.password, self.url = user, password, url
        self.inbox_prefix = f"_INBOX_{user}" if inbox_prefix == "default" else inbox_prefix
        self.errors: list[str] = []
        self.nc = None

    async def connect(self) -> "Conn":
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e))

        kwargs = dict(user=self.user, password=self.password, error_cb=on_error, allow_reconnect=False,
                      connect_timeout=2, max_reconnect_attempts=0, name=f"probe-{self.user}")
        if self.inbox_prefix:
            kwargs["inbox_prefix"] = self.inbox_prefix
        self.nc = await nats.connect(self.url, **kwargs)
        return self

    async def close(self) -> None:
        if self.nc and not self.nc.is_closed:
            await self.nc.close()

    # ---- plain request/reply, as async-nats Context::request does
    async def api(self, subject: str, body: dict | None = None, timeout: float = 2.0) -> dict:
        payload = json.dumps(body).encode() if body is not None else b""
        msg = await self.nc.request(subject, payload, timeout=timeout)
        return json.loads(msg.data) if msg.data else {}

    async def js_publish(self, subject: str, payload: bytes, msg_id: str | None = None,
                         headers: dict | None = None) -> dict:
        h = dict(headers or {})
        if msg_id:
            h["Nats-Msg-Id"] = msg_id
        msg = await self.nc.request(subject, payload, timeout=2.0, headers=h or None)
        return json.loads(msg.data)

    # ---- permission observations
    def _violations(self, since: int, kind: str, subject: str) -> bool:
        # nats-py lower-cases the server's -ERR text
        needle = f'permissions violation for {kind} to "{subject}"'.lower()
        return any(needle in e.lower() for e in self.errors[since:])

    async def _await_violation(self, since: int, kind: str, subject: str, wait: float = 2.0) -> bool:
        deadline = time.time() + wait
        while time.time() < deadline:
            if self._violations(since, kind, subject):
                return True
            await asyncio.sleep(0.05)
        return False

    async def denied_publish(self, subject: str, payload: bytes = b"{}", reply: bool = True) -> bool:
        since = len(self.errors)
        await self.nc.publish(subject, payload, reply=self.nc.new_inbox() if reply else "")
        await self.nc.flush()
        return await self._await_violation(since, "Publish", subject)

    async def denied_subscribe(self, subject: str) -> bool:
        since = len(self.errors)
        sub = await self.nc.subscribe(subject)
        await self.nc.flush()
        denied = await self._await_violation(since, "Subscription", subject)
        try:
            await sub.unsubscribe()
        except Exception:
            pass
        return denied

    async def quiet_publish(self, subject: str, payload: bytes = b"") -> bool:
        """A plain publish (acks, flow control) that must raise no permission error."""
        since = len(self.errors)
        await self.nc.publish(subject, payload)
        await self.nc.flush()
        await asyncio.sleep(0.2)
        return not any("permissions violation" in e.lower() for e in self.errors[since:])

    # ---- pull, as consumer::pull (MSG.NEXT with the reply on a fresh inbox)
    async def pull(self, stream: str, consumer: str, batch: int = 1, expires: float = 1.0) -> list:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                              json.dumps({"batch": batch, "expires": int(expires * NS)}).encode(), reply=inbox)
        got = []
        deadline = time.time() + expires + 1
        while len(got) < batch and time.time() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.05, deadline - time.time()))
            except nats_errors.TimeoutError:
                break
            if msg.headers and msg.headers.get("Status") and not msg.data:
                if msg.headers.get("Status") in ("404", "408", "409"):
                    break
                continue  # heartbeats
            got.append(msg)
        await sub.unsubscribe()
        return got

    # ---- KV, as kv::Store
    async def kv_entry(self, key: str) -> tuple[bytes, int] | None:
        msg = await self.nc.request(f"$JS.API.DIRECT.GET.KV_rowsmith-jobs.$KV.rowsmith-jobs.{key}", b"",
                                    timeout=2.0)
        if msg.headers and msg.headers.get("Status") == "404":
            return None
        return msg.data, int(msg.headers["Nats-Sequence"])

    async def kv_update(self, key: str, value: bytes, revision: int) -> dict:
        return await self.js_publish(f"$KV.rowsmith-jobs.{key}", value,
                                     headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})

    async def kv_create(self, key: str, value: bytes) -> dict:
        return await self.kv_update(key, value, 0)


def ok_api(r: dict) -> bool:
    return "error" not in r


async def ensure_topology(c: Conn) -> list[str]:
    """shared/bus/src/lib.rs ensure_topology, subject by subject. Returns what it did."""
    did = []
    for cfg in (WORK_STREAM, EVENTS_STREAM):
        r = await c.api(f"$JS.API.STREAM.UPDATE.{cfg['name']}", cfg)
        if r.get("error", {}).get("code") == 404:
            r = await c.api(f"$JS.API.STREAM.CREATE.{cfg['name']}", cfg)
            did.append(f"created {cfg['name']}")
        else:
            did.append(f"updated {cfg['name']}")
        if not ok_api(r):
            raise RuntimeError(f"{cfg['name']}: {r['error']}")
    r = await c.api("$JS.API.STREAM.INFO.KV_rowsmith-jobs")
    if r.get("error", {}).get("code") == 404:
        account = await c.api("$JS.API.INFO")
        if not ok_api(account):
            raise RuntimeError(f"account info: {account['error']}")
        r = await c.api("$JS.API.STREAM.CREATE.KV_rowsmith-jobs", KV_STREAM)
        did.append("created KV_rowsmith-jobs")
    else:
        did.append("found KV_rowsmith-jobs")
    if not ok_api(r):
        raise RuntimeError(f"KV: {r['error']}")
    return did


async def verify_topology(c: Conn) -> None:
    """What a service needs once topology is not its job: get_stream + get_key_value."""
    for name in ("ROWSMITH_WORK", "ROWSMITH_EVENTS", "KV_rowsmith-jobs"):
        r = await c.api(f"$JS.API.STREAM.INFO.{name}")
        if not ok_api(r):
            raise RuntimeError(f"{name}: {r['error']}")


async def work_consumer(c: Conn, durable: str, filter_subject: str, max_deliver: int = 5) -> dict:
    """Bus::work_consumer: get_stream, then stream.create_consumer(pull::Config)."""
    info = await c.api("$JS.API.STREAM.INFO.ROWSMITH_WORK")
    if not ok_api(info):
        return info
    body = {
        "stream_name": "ROWSMITH_WORK",
        "config": {
            "durable_name": durable,
            "filter_subject": filter_subject,
            "ack_policy": "explicit",
            "ack_wait": 300 * NS,
            "max_deliver": max_deliver,
            "max_ack_pending": 20000 if durable == "poller" else 1000,
            "deliver_policy": "all",
            "replay_policy": "instant",
        },
        "action": "",
    }
    return await c.api(f"$JS.API.CONSUMER.CREATE.ROWSMITH_WORK.{durable}.{filter_subject}", body)


def ordered_config(filter_subject: str, deliver_subject: str | None = None, **extra) -> dict:
    cfg = {
        "deliver_policy": "all",
        "ack_policy": "none",
        "max_deliver": 1,
        "filter_subject": filter_subject,
        "replay_policy": "instant",
        "inactive_threshold": 30 * NS,
        "num_replicas": 1,
        "mem_storage": True,
    }
    if deliver_subject:
        cfg.update(deliver_subject=deliver_subject, flow_control=True, idle_heartbeat=5 * NS)
    cfg.update(extra)
    return cfg


# --------------------------------------------------------------------------- scenario

async def refused_connect(url: str, **kwargs) -> tuple[bool, str]:
    async def quiet(_e: Exception) -> None:
        pass

    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0,
                                error_cb=quiet, **kwargs)
    except Exception as e:  # noqa: BLE001
        return True, f"{type(e).__name__}: {e}"
    await nc.close()
    return False, "connected"


async def full_config(server: Server, pw: dict[str, str]) -> None:
    url = server.url
    conns: dict[str, Conn] = {}
    for user in USERS:
        conns[user] = await Conn(user, pw[user], url, inbox_prefix=None if user == "admin" else "default").connect()
    cli, admin = conns["cli"], conns["admin"]
    job = "probe-job-1"

    # ------------------------------------------------------------------ (a) topology
    R.begin("(a) every user can run ensure_topology (current Bus::connect)")
    for user in ["ingest", "submitter", "poller", "merger", "cli"]:
        try:
            did = await ensure_topology(conns[user])
            R.check(f"{user}: ensure_topology", True, ", ".join(did))
        except Exception as e:  # noqa: BLE001
            R.check(f"{user}: ensure_topology", False, str(e))

    # ------------------------------------------------------------------ (b) the job's path
    R.begin("(b) each service: its durable, its outputs, its KV keys, ack/nak/term")
    for user, (durable, filt, _) in SERVICES.items():
        r = await work_consumer(conns[user], durable, filt, max_deliver=-1 if user == "poller" else 5)
        R.check(f"{user}: create durable '{durable}' on {filt}", ok_api(r), json.dumps(r.get("error", "")))

    spec = json.dumps({"job_id": job, "input": "inputs/x.csv"}).encode()
    a1 = await cli.js_publish("rowsmith.jobs.submit", spec, msg_id=job)
    a2 = await cli.js_publish("rowsmith.jobs.submit", spec, msg_id=job)
    R.check("cli: publish JobSpec on rowsmith.jobs.submit (PubAck from ROWSMITH_WORK)",
            a1.get("stream") == "ROWSMITH_WORK", str(a1))
    R.check("cli: same Nats-Msg-Id again is a duplicate", a2.get("duplicate") is True, str(a2))

    # ingest
    ing = conns["ingest"]
    msgs = await ing.pull("ROWSMITH_WORK", "ingest")
    R.check("ingest: pull rowsmith.jobs.submit from its durable", len(msgs) == 1 and msgs[0].subject == "rowsmith.jobs.submit")
    reply = msgs[0].reply if msgs else ""
    R.check("ingest: ack subject is $JS.ACK.ROWSMITH_WORK.ingest.<...>", reply.startswith("$JS.ACK.ROWSMITH_WORK.ingest."), reply)
    r = await ing.kv_create(f"job.{job}", b'{"state":"accepted"}')
    R.check("ingest: KV create job.<id>", ok_api(r), str(r))
    r = await ing.kv_create(f"job.{job}", b'{"state":"accepted"}')
    R.check("ingest: KV create of an existing key fails with wrong last sequence",
            r.get("error", {}).get("err_code") == 10071, str(r))
    r = await ing.kv_create(f"shard.{job}.1.0", b'{"state":"ready"}')
    R.check("ingest: KV create shard.<job>.1.0", ok_api(r), str(r))
    entry = await ing.kv_entry(f"job.{job}")
    R.check("ingest: KV read (DIRECT.GET) job.<id>", entry is not None and b"accepted" in entry[0])
    r = await ing.kv_update(f"job.{job}", b'{"state":"running"}', entry[1] if entry else 0)
    R.check("ingest: KV compare-and-set update", ok_api(r), str(r))
    r = await ing.kv_update(f"job.{job}", b'{"state":"stale"}', entry[1] if entry else 0)
    R.check("ingest: KV update with a stale revision is refused (10071)", r.get("error", {}).get("err_code") == 10071, str(r))
    r = await ing.js_publish("rowsmith.shards.ready", b'{"shard":0}', msg_id=f"ready.{job}.1.0")
    R.check("ingest: publish rowsmith.shards.ready", ok_api(r) and r.get("stream") == "ROWSMITH_WORK", str(r))
    r = await ing.js_publish(f"rowsmith.events.{job}.accepted", b'{"kind":"accepted"}', msg_id=f"{job}.accepted.1")
    R.check("ingest: publish event rowsmith.events.<job>.accepted", r.get("stream") == "ROWSMITH_EVENTS", str(r))
    R.check("ingest: +ACK its message", await ing.quiet_publish(reply, b"+ACK"))
    info = await ing.api("$JS.API.CONSUMER.INFO.ROWSMITH_WORK.ingest")
    R.check("ingest: CONSUMER.INFO of its durable (nothing pending after the ack)",
            ok_api(info) and info.get("num_ack_pending") == 0 and info.get("num_pending") == 0, str(info.get("error", "")))

    # submitter
    sub_ = conns["submitter"]
    msgs = await sub_.pull("ROWSMITH_WORK", "submitter")
    R.check("submitter: pull rowsmith.shards.ready", len(msgs) == 1 and msgs[0].subject == "rowsmith.shards.ready")
    r = await sub_.kv_create("quota.sim.gpt-4o-mini", b'{"enqueued":0}')
    R.check("submitter: KV create quota.<provider>.<model>", ok_api(r), str(r))
    e = await sub_.kv_entry(f"shard.{job}.1.0")
    r = await sub_.kv_update(f"shard.{job}.1.0", b'{"state":"submitted"}', e[1] if e else 0)
    R.check("submitter: KV CAS shard.<job>.1.0", ok_api(r), str(r))
    r = await sub_.js_publish("rowsmith.batches.submitted", b'{"batch":"b1"}', msg_id=f"submitted.{job}.1.0")
    R.check("submitter: publish rowsmith.batches.submitted", r.get("stream") == "ROWSMITH_WORK", str(r))
    r = await sub_.js_publish(f"rowsmith.events.{job}.shard_submitted", b"{}", msg_id=f"{job}.ss.1")
    R.check("submitter: publish event", r.get("stream") == "ROWSMITH_EVENTS", str(r))
    R.check("submitter: +ACK", await sub_.quiet_publish(msgs[0].reply if msgs else "x", b"+ACK"))

    # poller: NAK with delay, redelivery, ack
    pol = conns["poller"]
    msgs = await pol.pull("ROWSMITH_WORK", "poller")
    R.check("poller: pull rowsmith.batches.submitted", len(msgs) == 1 and msgs[0].subject == "rowsmith.batches.submitted")
    t0 = time.time()
    R.check("poller: -NAK {\"delay\": 1s} (the polling backoff)",
            await pol.quiet_publish(msgs[0].reply if msgs else "x", b"-NAK " + json.dumps({"delay": NS}).encode()))
    again = await pol.pull("ROWSMITH_WORK", "poller", expires=3.0)
    waited = time.time() - t0
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
    delivered = again[0].reply.split(".")[4] if again else "?"
    R.check("poller: redelivered after the delay (delivery 2)", bool(again) and delivered == "2" and waited >= 0.9,
            f"waited {waited:.1f}s, delivery {delivered}")
    e = await pol.kv_entry("quota.sim.gpt-4o-mini")
    r = await pol.kv_update("quota.sim.gpt-4o-mini", b'{"enqueued":1}', e[1] if e else 0)
    R.check("poller: KV CAS quota.*", ok_api(r), str(r))
    e = await pol.kv_entry(f"shard.{job}.1.0")
    r = await pol.kv_update(f"shard.{job}.1.0", b'{"state":"ended"}', e[1] if e else 0)
    R.check("poller: KV CAS shard.*", ok_api(r), str(r))
    r = await pol.js_publish("rowsmith.batches.ended", b'{"status":"completed"}', msg_id=f"ended.{job}.1.0")
    R.check("poller: publish rowsmith.batches.ended", r.get("stream") == "ROWSMITH_WORK", str(r))
    r = await pol.js_publish("rowsmith.shards.ready", b'{"resubmit":1}', msg_id=f"ready.{job}.1.0.resubmit1")
    R.check("poller: publish rowsmith.shards.ready (quota resubmit)", r.get("stream") == "ROWSMITH_WORK", str(r))
    R.check("poller: +ACK", await pol.quiet_publish(again[0].reply if again else "x", b"+ACK"))

    # merger
    mer = conns["merger"]
    msgs = await mer.pull("ROWSMITH_WORK", "merger")
    R.check("merger: pull rowsmith.batches.ended", len(msgs) == 1 and msgs[0].subject == "rowsmith.batches.ended")
    r = await mer.kv_create(f"shard.{job}.2.0", b'{"state":"ready"}')
    R.check("merger: KV create shard.<job>.2.0 (retry attempt)", ok_api(r), str(r))
    e = await mer.kv_entry(f"job.{job}")
    r = await mer.kv_update(f"job.{job}", b'{"state":"merging"}', e[1] if e else 0)
    R.check("merger: KV CAS job.*", ok_api(r), str(r))
    r = await mer.js_publish("rowsmith.shards.ready", b'{"attempt":2}', msg_id=f"ready.{job}.2.0")
    R.check("merger: publish rowsmith.shards.ready (retry)", r.get("stream") == "ROWSMITH_WORK", str(r))
    r = await mer.js_publish(f"rowsmith.events.{job}.retrying", b"{}", msg_id=f"{job}.retrying.1")
    R.check("merger: publish event", r.get("stream") == "ROWSMITH_EVENTS", str(r))
    R.check("merger: +ACK", await mer.quiet_publish(msgs[0].reply if msgs else "x", b"+ACK"))

    # submitter terminates the two remaining shards.ready (a poison message, say)
    msgs = await sub_.pull("ROWSMITH_WORK", "submitter", batch=2)
    R.check("submitter: pull the 2 other shards.ready and +TERM them",
            len(msgs) == 2 and all([await sub_.quiet_publish(m.reply, b"+TERM") for m in msgs]))
    await asyncio.sleep(0.2)
    si = await admin.api("$JS.API.STREAM.INFO.ROWSMITH_WORK")
    R.check("ROWSMITH_WORK is empty (WorkQueue: acked and terminated messages removed)",
            si.get("state", {}).get("messages") == 0, str(si.get("state")))

    # ------------------------------------------------------------------ cli reads
    R.begin("(b) cli: status, list, events, cancel")
    e = await cli.kv_entry(f"job.{job}")
    R.check("cli: `status` reads job.<id> (DIRECT.GET)", e is not None and b"merging" in e[0])

    # `list`: kv.keys() = ordered push consumer, headers only, last per subject
    inbox = cli.nc.new_inbox()
    box = await cli.nc.subscribe(inbox)
    r = await cli.api("$JS.API.CONSUMER.CREATE.KV_rowsmith-jobs", {
        "stream_name": "KV_rowsmith-jobs",
        "config": ordered_config("$KV.rowsmith-jobs.>", inbox, headers_only=True,
                                 deliver_policy="last_per_subject", description="kv history consumer"),
        "action": ""})
    R.check("cli: kv.keys() creates its ordered push consumer on KV_rowsmith-jobs", ok_api(r), str(r.get("error", "")))
    keys = set()
    for _ in range(r.get("num_pending", 0) or 10):
        try:
            m = await box.next_msg(timeout=1.0)
        except nats_errors.TimeoutError:
            break
        if m.subject.startswith("$KV.rowsmith-jobs."):
            keys.add(m.subject[len("$KV.rowsmith-jobs."):])
    await box.unsubscribe()
    want = {f"job.{job}", f"shard.{job}.1.0", f"shard.{job}.2.0", "quota.sim.gpt-4o-mini"}
    R.check("cli: the keys arrive on its own inbox", keys == want, f"{sorted(keys)}")
    name = r.get("name", "x")
    info = await cli.api(f"$JS.API.CONSUMER.INFO.KV_rowsmith-jobs.{name}")
    R.check("cli: CONSUMER.INFO of that consumer", ok_api(info), str(info.get("error", "")))
    R.check("cli: flow-control reply on $JS.FC.KV_rowsmith-jobs.<consumer>.<id>",
            await cli.quiet_publish(f"$JS.FC.KV_rowsmith-jobs.{name}.ab12", b""))
    d = await cli.api(f"$JS.API.CONSUMER.DELETE.KV_rowsmith-jobs.{name}")
    R.check("cli: CONSUMER.DELETE of it (ordered consumer reset)", ok_api(d), str(d.get("error", "")))
    r2 = await cli.api(f"$JS.API.CONSUMER.CREATE.KV_rowsmith-jobs.{name}_1.$KV.rowsmith-jobs.>", {
        "stream_name": "KV_rowsmith-jobs",
        "config": ordered_config("$KV.rowsmith-jobs.>", cli.nc.new_inbox(), name=f"{name}_1", headers_only=True,
                                 deliver_policy="last_per_subject"),
        "action": ""})
    R.check("cli: re-create it by name (CONSUMER.CREATE.KV_rowsmith-jobs.<name>_1.<filter>)", ok_api(r2), str(r2.get("error", "")))

    # `watch` / `events`: ordered pull consumer on ROWSMITH_EVENTS
    for filt in (f"rowsmith.events.{job}.>", "rowsmith.events.>"):
        r = await cli.api("$JS.API.CONSUMER.CREATE.ROWSMITH_EVENTS", {
            "stream_name": "ROWSMITH_EVENTS", "config": ordered_config(filt), "action": ""})
        R.check(f"cli: ordered pull consumer on ROWSMITH_EVENTS filtered {filt}", ok_api(r), str(r.get("error", "")))
        name = r.get("name", "x")
        got = await cli.pull("ROWSMITH_EVENTS", name, batch=10, expires=1.0)
        kinds = [m.subject.rsplit(".", 1)[1] for m in got]
        R.check("cli: pulls the job's events in order", kinds == ["accepted", "shard_submitted", "retrying"], str(kinds))
        info = await cli.api(f"$JS.API.CONSUMER.INFO.ROWSMITH_EVENTS.{name}")
        R.check("cli: CONSUMER.INFO of it (after a reconnect)", ok_api(info))
        d = await cli.api(f"$JS.API.CONSUMER.DELETE.ROWSMITH_EVENTS.{name}")
        R.check("cli: CONSUMER.DELETE of it (reset)", ok_api(d))
        r2 = await cli.api(f"$JS.API.CONSUMER.CREATE.ROWSMITH_EVENTS.{name}_1.{filt}", {
            "stream_name": "ROWSMITH_EVENTS", "config": ordered_config(filt, name=f"{name}_1"), "action": ""})
        R.check(f"cli: re-create by name, subject ends in the filter ('{filt}')", ok_api(r2), str(r2.get("error", "")))
        await cli.api(f"$JS.API.CONSUMER.DELETE.ROWSMITH_EVENTS.{name}_1")

    # `cancel`: request_cancel = CAS on job.<id> + a batch_progress event
    e = await cli.kv_entry(f"job.{job}")
    r = await cli.kv_update(f"job.{job}", b'{"state":"merging","cancel_requested":true}', e[1] if e else 0)
    R.check("cli: `cancel` CAS on job.<id>", ok_api(r), str(r))
    r = await cli.js_publish(f"rowsmith.events.{job}.batch_progress", b"{}", msg_id=f"{job}.bp.1")
    R.check("cli: `cancel` publishes rowsmith.events.<job>.batch_progress", r.get("stream") == "ROWSMITH_EVENTS", str(r))

    # no allowed step above produced a permission error
    for user, c in conns.items():
        bad = [e for e in c.errors if "permissions violation" in e.lower()]
        R.check(f"{user}: no permission error on any allowed step", not bad, "; ".join(bad))

    # ------------------------------------------------------------------ (c) refusals
    R.begin("(c) refused")
    denied_pubs = [
        ("ingest", "rowsmith.batches.ended", "another service's output"),
        ("ingest", "rowsmith.jobs.submit", "inject a job"),
        ("ingest", "rowsmith.batches.submitted", "another service's output"),
        ("submitter", "rowsmith.shards.ready", "another service's output"),
        ("submitter", "rowsmith.jobs.submit", "inject a job"),
        ("poller", "rowsmith.batches.submitted", "its own input"),
        ("merger", "rowsmith.batches.ended", "its own input"),
        ("merger", "rowsmith.batches.submitted", "another service's output"),
        ("cli", "rowsmith.shards.ready", "work subject"),
        ("cli", "rowsmith.batches.ended", "work subject"),
        ("cli", f"rowsmith.events.{job}.completed", "fake a job's end"),
        ("ingest", "$JS.API.CONSUMER.MSG.NEXT.ROWSMITH_WORK.merger", "pull another service's durable"),
        ("cli", "$JS.API.CONSUMER.MSG.NEXT.ROWSMITH_WORK.ingest", "pull a work durable"),
        ("ingest", "$JS.API.CONSUMER.CREATE.ROWSMITH_WORK.ingest.rowsmith.batches.ended", "own durable, foreign filter"),
        ("ingest", "$JS.API.CONSUMER.CREATE.ROWSMITH_WORK.spy.rowsmith.batches.ended", "a new durable"),
        ("ingest", "$JS.API.CONSUMER.CREATE.ROWSMITH_WORK", "an ephemeral consumer on the work stream"),
        ("cli", "$JS.API.CONSUMER.CREATE.ROWSMITH_WORK", "an ephemeral consumer on the work stream"),
        ("poller", "$JS.ACK.ROWSMITH_WORK.ingest.1.5.5.0.0", "ack another service's message"),
        ("cli", "$JS.API.CONSUMER.DELETE.ROWSMITH_WORK.poller", "delete a work durable"),
        ("merger", "$JS.API.CONSUMER.DELETE.ROWSMITH_WORK.merger", "delete even its own durable"),
        ("cli", "$JS.API.STREAM.DELETE.ROWSMITH_WORK", "delete the work stream"),
        ("ingest", "$JS.API.STREAM.PURGE.ROWSMITH_WORK", "purge the work stream"),
        ("poller", "$JS.API.STREAM.DELETE.KV_rowsmith-jobs", "delete the bucket"),
        ("submitter", "$JS.API.STREAM.PURGE.KV_rowsmith-jobs", "purge the bucket"),
        ("cli", "$JS.API.STREAM.MSG.DELETE.ROWSMITH_EVENTS", "delete an event"),
        ("ingest", "$JS.API.STREAM.CREATE.OTHER", "create another stream"),
        ("ingest", "$KV.rowsmith-jobs.quota.sim.x", "write a quota record"),
        ("merger", "$KV.rowsmith-jobs.quota.sim.x", "write a quota record"),
        ("cli", f"$KV.rowsmith-jobs.shard.{job}.1.0", "write a shard record"),
        ("cli", "$KV.rowsmith-jobs.quota.sim.x", "write a quota record"),
        ("ingest", "$KV.rowsmith-jobs.other", "a key outside job./shard."),
        ("ingest", "$JS.API.CONSUMER.CREATE.KV_rowsmith-jobs", "services do not list keys"),
    ]
    for user, subject, why in denied_pubs:
        R.check(f"{user} publish {subject}  [{why}]", await conns[user].denied_publish(subject))

    denied_subs = [
        ("ingest", "_INBOX.>", "the default inbox space"),
        ("ingest", "_INBOX_cli.>", "another user's inbox"),
        ("cli", "_INBOX_poller.>", "another user's inbox"),
        ("ingest", "rowsmith.>", "sniff the work subjects"),
        ("cli", "rowsmith.jobs.submit", "sniff JobSpecs"),
        ("poller", "$KV.rowsmith-jobs.>", "sniff KV writes"),
        ("merger", "$JS.ACK.>", "sniff acks"),
        ("cli", ">", "everything"),
    ]
    for user, subject, why in denied_subs:
        R.check(f"{user} subscribe {subject}  [{why}]", await conns[user].denied_subscribe(subject))

    refused, why = await refused_connect(server.url)
    R.check("a connection without credentials is refused", refused, why)
    refused, why = await refused_connect(server.url, user="ingest", password="wrong")
    R.check("ingest with a wrong password is refused", refused, why)
    refused, why = await refused_connect(server.url, user="ingest", password=pw["cli"])
    R.check("ingest with cli's password is refused", refused, why)

    # The default _INBOX prefix: subscription refused, so every request times out.
    plain = await Conn("ingest", pw["ingest"], server.url, inbox_prefix=None).connect()
    try:
        await plain.api("$JS.API.STREAM.INFO.ROWSMITH_WORK", timeout=1.0)
        timed_out = False
    except nats_errors.TimeoutError:
        timed_out = True
    R.check("ingest without its inbox prefix: reply subscription refused, request times out",
            timed_out and any('subscription to "_inbox.' in e.lower() for e in plain.errors), "; ".join(plain.errors[:1]))
    await plain.close()

    # admin (quoted bcrypt hash in ADMIN_PASSWORD) may do anything in the account
    r = await admin.api("$JS.API.STREAM.NAMES")
    R.check("admin: any JetStream API call (STREAM.NAMES)", sorted(r.get("streams") or []) ==
            ["KV_rowsmith-jobs", "ROWSMITH_EVENTS", "ROWSMITH_WORK"], str(r.get("streams")))

    for c in conns.values():
        await c.close()


async def strict_config(binary: str, strict_conf: Path, env: dict[str, str], pw: dict[str, str]) -> None:
    server = Server(binary, strict_conf, env)
    rc, out = server.test_config()
    R.begin("(d) strict variant: grep -v '# topology$' (topology by admin; services verify only)")
    R.check("nats-server -t accepts the strict variant", rc == 0, out)
    server.start()
    try:
        conns = {u: await Conn(u, pw[u], server.url, None if u == "admin" else "default").connect() for u in USERS}
        try:
            await ensure_topology(conns["ingest"])
            R.check("ingest cannot run ensure_topology any more", False, "it could")
        except nats_errors.TimeoutError:
            R.check("ingest cannot run ensure_topology any more (STREAM.UPDATE refused, request times out)",
                    conns["ingest"]._violations(0, "Publish", "$JS.API.STREAM.UPDATE.ROWSMITH_WORK"))
        did = await ensure_topology(conns["admin"])
        R.check("admin runs ensure_topology (the set-up job)", True, ", ".join(did))
        for user, (durable, filt, outputs) in SERVICES.items():
            c = conns[user]
            try:
                await verify_topology(c)
                verified = True
            except Exception as e:  # noqa: BLE001
                verified = False
            R.check(f"{user}: verify-only start (STREAM.INFO of the 3 streams)", verified)
            r = await work_consumer(c, durable, filt)
            R.check(f"{user}: create its durable", ok_api(r), str(r.get("error", "")))
            r = await c.js_publish(outputs[0], b"{}", msg_id=f"strict.{user}")
            R.check(f"{user}: publish {outputs[0]}", r.get("stream") == "ROWSMITH_WORK", str(r))
            R.check(f"{user}: STREAM.UPDATE.ROWSMITH_EVENTS refused",
                    await c.denied_publish("$JS.API.STREAM.UPDATE.ROWSMITH_EVENTS"))
        c = conns["cli"]
        try:
            await verify_topology(c)
            R.check("cli: verify-only start", True)
        except Exception as e:  # noqa: BLE001
            R.check("cli: verify-only start", False, str(e))
        r = await c.js_publish("rowsmith.jobs.submit", b"{}", msg_id="strict.cli")
        R.check("cli: publish rowsmith.jobs.submit", r.get("stream") == "ROWSMITH_WORK", str(r))
        R.check("cli: STREAM.CREATE.KV_rowsmith-jobs refused", await c.denied_publish("$JS.API.STREAM.CREATE.KV_rowsmith-jobs"))
        for c in conns.values():
            await c.close()
    finally:
        server.stop()


async def main() -> int:
    global R
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nats-server")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    R = Results(args.verbose)
    binary = find_server(args.nats_server)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    pw, pw_env, how = make_passwords()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PASSWORD")}
    env.update(pw_env)
    print(f"{version}; config {CONF.relative_to(REPO)}; admin password given as {how}")

    server = Server(binary, CONF, env)
    R.begin("config")
    rc, out = server.test_config()
    R.check("nats-server -t accepts rowsmith-auth.conf", rc == 0, out)
    missing = {k: v for k, v in env.items() if k != "CLI_PASSWORD"}
    rc, out = Server(binary, CONF, missing).test_config()
    R.check("a missing password variable is an error", rc != 0 and "CLI_PASSWORD" in out, out)
    if how == "bcrypt hash":
        unquoted = dict(env, ADMIN_PASSWORD=env["ADMIN_PASSWORD"].strip('"'))
        rc, out = Server(binary, CONF, unquoted).test_config()
        R.check("an unquoted bcrypt hash in the env is an error (quote it)", rc != 0, out)
    server.start()
    try:
        await full_config(server, pw)
    finally:
        server.stop()

    strict = Path(tempfile.mkdtemp(prefix="rowsmith-strict-")) / "rowsmith-auth-strict.conf"
    strict.write_text("".join(line for line in CONF.read_text().splitlines(keepends=True)
                              if not line.rstrip().endswith("# topology")))
    try:
        await strict_config(binary, strict, env, pw)
    finally:
        shutil.rmtree(strict.parent, ignore_errors=True)

    print(f"\n{R.passed} checks passed, {len(R.failed)} failed")
    for f in R.failed:
        print(f"  FAILED {f}")
    return 0 if not R.failed else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
