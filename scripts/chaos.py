#!/usr/bin/env python3
"""Chaos test: every service as its own process (two pollers), the simulator pacing a job,
kill -9 of random services while it runs (and one nats-server restart), then checks from the
output files and the simulator's counters that every input row is in enriched.csv or
failures.csv exactly once and that no shard attempt got two provider batches.

Run through scripts/chaos (which builds the binaries and sets up the environment)."""
import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SERVICES = ["ingest", "submitter", "poller", "poller", "merger"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"chaos: nothing listens on port {port} after {timeout}s")


def write_table(path, rows):
    """The job's input: ids 0000000.. with awkward descriptions, every 100th empty."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "description"])
        for i in range(rows):
            description = "" if i % 100 == 42 else f"Item {i}: a \"sturdy\", useful thing,\nsecond line ✓"
            writer.writerow([f"{i:07d}", f"Item {i}", description])
    return path


def rows_seen(out):
    """How often each input id is in enriched.csv and failures.csv together."""
    seen = {}
    for name in ("enriched.csv", "failures.csv"):
        with open(os.path.join(out, name), newline="") as f:
            for row in csv.DictReader(f):
                seen[row["id"]] = seen.get(row["id"], 0) + 1
    return seen


def rows_exactly_once(seen, rows, failures):
    """Whether every input row is there exactly once; says what is wrong in `failures`."""
    expected = {f"{i:07d}" for i in range(rows)}
    exactly_once = set(seen) == expected and all(count == 1 for count in seen.values())
    if not exactly_once:
        missing = len(expected - set(seen))
        doubled = sum(1 for count in seen.values() if count > 1)
        failures.append(f"rows: {missing} missing, {doubled} more than once")
    return exactly_once


class Process:
    def __init__(self, name, argv, env, log_dir):
        self.name, self.argv, self.env = name, argv, env
        self.log = open(os.path.join(log_dir, f"{name}.log"), "ab")
        self.popen = None
        self.kills = 0

    def start(self):
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=self.log)

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def kill9(self):
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()
        self.kills += 1

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=2000, help="requests per batch")
    parser.add_argument("--pace", type=float, default=40.0, help="simulator rows/s per batch")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.time()
    work = tempfile.mkdtemp(prefix="rowsmith-chaos.")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    nats_port, sim_port = free_port(), free_port()

    env = dict(os.environ)
    env.update({
        "ROWSMITH_NATS__URL": f"nats://127.0.0.1:{nats_port}",
        "ROWSMITH_STORE__URL": f"file://{work}/store",
        "ROWSMITH_PROVIDER__SIM__BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "ROWSMITH_POLLER__SCHEDULE": "300ms,600ms,1s",
        "ROWSMITH_POLLER__ACK_WAIT": "10s",
        "ROWSMITH_INGEST__ACK_WAIT": "20s",
        "ROWSMITH_SUBMITTER__ACK_WAIT": "5s",
        "ROWSMITH_MERGER__ACK_WAIT": "10s",
        "ROWSMITH_MERGER__MAX_DELIVER": "50",
        "ROWSMITH_INGEST__MAX_DELIVER": "50",
        "ROWSMITH_SUBMITTER__CHAOS_CRASH_AFTER_CREATE": "0.3",
        # A submitter killed holding a creation claim delays its shard by the lease.
        "ROWSMITH_CREATION__LEASE": "3s",
        "ROWSMITH_SIM__ROWS_PER_SECOND": str(args.pace),
        "ROWSMITH_SIM__FAULTS__SERVER_ERROR_RATE": "0.01",
        "ROWSMITH_LOG__LEVEL": "info",
    })
    bin_dir = args.bin_dir
    nats = Process("nats-server", ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                                   "-sd", os.path.join(work, "jetstream")], env, logs)
    sim = Process("provider-sim", [os.path.join(bin_dir, "rowsmith-provider-sim"), "--listen",
                                   f"127.0.0.1:{sim_port}"], env, logs)
    services = [Process(f"{name}-{i}", [os.path.join(bin_dir, f"rowsmith-{name}")], env, logs)
                for i, name in enumerate(SERVICES)]
    everything = [nats, sim] + services
    try:
        nats.start()
        wait_port(nats_port)
        sim.start()
        wait_port(sim_port)
        setup = subprocess.run([os.path.join(bin_dir, "rowsmith"), "setup"], env=env,
                               capture_output=True, text=True, timeout=60)
        if setup.returncode != 0:
            raise SystemExit(f"chaos: rowsmith setup failed: {setup.stderr}")
        for service in services:
            service.start()

        table = write_table(os.path.join(work, "input.csv"), args.rows)
        submit = subprocess.run(
            [os.path.join(bin_dir, "rowsmith"), "submit", table, "--job-id", "chaos",
             "--instructions", "Write a title and pick a category.", "--target", "description",
             "--field", "title:string", "--field", "category:enum(toys|tools|garden)",
             "--max-requests-per-batch", str(args.batch)],
            env=env, capture_output=True, text=True, timeout=60)
        if submit.returncode != 0:
            raise SystemExit(f"chaos: submit failed: {submit.stderr}")

        kills = nats_restarts = 0
        next_kill = time.time() + args.interval
        state = None
        while time.time() - started < args.timeout:
            status = subprocess.run([os.path.join(bin_dir, "rowsmith"), "status", "chaos", "--json"],
                                    env=env, capture_output=True, text=True, timeout=30)
            if status.returncode == 0:
                state = json.loads(status.stdout)["state"]
                if state in ("completed", "failed", "cancelled"):
                    break
            for service in services:
                if not service.alive():  # the submitter's crash hook, or a crash
                    service.start()
            if kills < args.kills and time.time() >= next_kill:
                if kills == args.kills // 2 and nats_restarts == 0:
                    nats.stop(signal.SIGTERM)
                    nats.start()
                    wait_port(nats_port)
                    nats_restarts += 1
                least = min(s.kills for s in services)
                victim = rng.choice([s for s in services if s.kills == least] if least < 2 else services)
                victim.kill9()
                time.sleep(0.2)
                victim.start()
                kills += 1
                next_kill = time.time() + args.interval * rng.uniform(0.5, 1.5)
            time.sleep(0.3)
        seconds = time.time() - started

        failures = []
        if state != "completed":
            failures.append(f"job ended {state!r}, not completed")
        out = os.path.join(work, "out")
        result = subprocess.run([os.path.join(bin_dir, "rowsmith"), "result", "chaos", "--out", out],
                                env=env, capture_output=True, text=True, timeout=60)
        seen = {}
        if result.returncode == 0:
            seen = rows_seen(out)
        else:
            failures.append(f"no result: {result.stderr.strip()}")
        exactly_once = rows_exactly_once(seen, args.rows, failures)
        with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/sim/stats", timeout=10) as answer:
            stats = json.load(answer)
        duplicate_batches = sum(count - 1 for count in stats["batches_per_shard"].values())
        if duplicate_batches:
            failures.append(f"duplicate batches: {stats['batches_per_shard']}")
        every_service_twice = all(
            sum(s.kills for s in services if s.name.startswith(name)) >= 2 for name in set(SERVICES))
        if kills >= args.kills and not every_service_twice:
            failures.append("not every service was killed twice")
        if kills < args.kills:
            failures.append(f"the job ended after {kills} of {args.kills} kills; slow the pace (--pace)")
        if nats_restarts != 1:
            failures.append("nats-server was not restarted")
        # Graceful shutdown: SIGTERM, in-flight work finished or released, exit 0 within 10 s.
        for service in services:
            if not service.alive():
                continue
            stopping = time.time()
            service.popen.send_signal(signal.SIGTERM)
            try:
                code = service.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                failures.append(f"{service.name} did not exit within 10 s of SIGTERM")
                continue
            if code != 0:
                failures.append(f"{service.name} exited {code} on SIGTERM after {time.time() - stopping:.1f}s")
        print(f"chaos: kills={kills} nats_restarts={nats_restarts} rows={args.rows} "
              f"rows_exactly_once={'yes' if exactly_once else 'no'} duplicate_batches={duplicate_batches} "
              f"seconds={seconds:.0f}")
        if failures:
            print(f"chaos: FAILED ({'; '.join(failures)}); seed {seed}; logs in {logs}", file=sys.stderr)
            return 1
        return 0
    finally:
        for process in reversed(everything):
            process.stop()


if __name__ == "__main__":
    sys.exit(main())
