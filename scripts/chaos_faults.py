#!/usr/bin/env python3
"""Chaos, second edition: the faults that make real systems pay twice.

Every service as its own process, two of each, on a three-node JetStream cluster (streams and
KV with three replicas), an S3 store (moto), one provider format (OpenAI through the simulator,
or Anthropic). While a job runs it kills services with -9, pauses a random worker (SIGSTOP)
for longer than its ack_wait and lets it carry on (SIGCONT), has the simulator lose create
answers after the batch exists (a 500, a dropped connection, an answer slower than the
client's timeout, in turn) and cut downloads off, makes the object store unreachable for 20 s
once, and kills the nats-server leading the work stream once. Then it checks, from the
outputs, the simulator's counters and the shard records: the job completed; every row is in
enriched.csv or failures.csv exactly once; each shard attempt has one batch, or every extra
one was cancelled and reported; every output file is whole.

Run through `scripts/chaos --faults` (which builds the binaries and sets up the environment)."""
import argparse
import asyncio
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from chaos import Process, free_port, rows_exactly_once, rows_seen, wait_port, write_table

SERVICES = ["ingest", "submitter", "poller", "merger"] * 2
ACK_WAIT = 6.0
LOST_AS = ["server_error", "dropped", "slow"]


class Cluster:
    """Three nats-server processes routed into one JetStream cluster on loopback ports."""

    def __init__(self, work, env, logs):
        self.ports = [free_port() for _ in range(3)]
        routes = [free_port() for _ in range(3)]
        self.nodes = []
        for i in range(3):
            others = ",".join(f"nats://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
            argv = ["nats-server", "-js", "-n", f"node-{i}", "-a", "127.0.0.1",
                    "-p", str(self.ports[i]), "--cluster_name", "chaos",
                    "--cluster", f"nats://127.0.0.1:{routes[i]}", "--routes", others,
                    "-sd", os.path.join(work, f"jetstream-{i}")]
            self.nodes.append(Process(f"node-{i}", argv, env, logs))

    def url(self):
        return ",".join(f"nats://127.0.0.1:{port}" for port in self.ports)

    def start(self):
        for node in self.nodes:
            node.start()
        for port in self.ports:
            wait_port(port)

    def node(self, name):
        return self.nodes[int(name.rsplit("-", 1)[1])]


async def with_js(url, work):
    import nats
    client = await nats.connect(servers=url.split(","), connect_timeout=5, max_reconnect_attempts=3)
    try:
        return await work(client.jetstream())
    finally:
        await client.close()


def nats_call(url, work, default=None):
    try:
        return asyncio.run(with_js(url, work))
    except Exception as error:  # a node down, an election under way: ask again later
        print(f"chaos: nats call failed: {error}", file=sys.stderr)
        return default


async def stream_leader(js):
    info = await js.stream_info("ROWSMITH_WORK")
    return info.cluster.leader if info.cluster else None


async def replicas(js):
    """Replicas of the work stream, the events stream and the KV bucket's stream."""
    names = ["ROWSMITH_WORK", "ROWSMITH_EVENTS", "KV_rowsmith-jobs"]
    return [(await js.stream_info(name)).config.num_replicas for name in names]


async def shard_records(js):
    kv = await js.key_value("rowsmith-jobs")
    records = []
    for key in await kv.keys():
        if key.startswith("shard."):
            records.append(json.loads((await kv.get(key)).value))
    return records


def start_s3(work, logs, env):
    port = free_port()
    tool = os.path.join(os.path.dirname(sys.executable), "moto_server")
    moto = Process("moto", [tool, "-H", "127.0.0.1", "-p", str(port)], env, logs)
    moto.start()
    wait_port(port, timeout=60)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/chaos", method="PUT")
    urllib.request.urlopen(request, timeout=10).close()
    return moto, port


def sim_faults(sim_port, lost_as):
    faults = {"server_error_rate": 0.01, "create_response_lost_every": 3,
              "create_response_lost_as": lost_as, "slow_create": "3s",
              "download_dropped_every": 4}
    request = urllib.request.Request(f"http://127.0.0.1:{sim_port}/sim/faults", method="POST",
                                     data=json.dumps(faults).encode(),
                                     headers={"content-type": "application/json"})
    urllib.request.urlopen(request, timeout=10).close()


def whole_csv(path):
    """Every line of the file parses and has the header's column count."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return all(len(row) == len(header) for row in reader)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--provider", choices=["sim", "anthropic"], default="sim")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=2000, help="requests per batch")
    parser.add_argument("--pace", type=float, default=40.0, help="simulator rows/s per batch")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stalls", type=int, default=5)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.time()
    work = tempfile.mkdtemp(prefix="rowsmith-chaos-faults.")
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    env = dict(os.environ)
    cluster = Cluster(work, env, logs)
    sim_port = free_port()
    moto, s3_port = start_s3(work, logs, env)
    stall_seconds = ACK_WAIT + 2
    env.update({
        "ROWSMITH_NATS__URL": cluster.url(),
        "ROWSMITH_NATS__REPLICAS": "3",
        "ROWSMITH_STORE__URL": "s3://chaos/run",
        "ROWSMITH_STORE__S3__ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "ROWSMITH_STORE__S3__REGION": "us-east-1",
        "ROWSMITH_STORE__S3__PATH_STYLE": "true",
        "ROWSMITH_STORE__S3__ALLOW_HTTP": "true",
        "ROWSMITH_STORE__S3__ACCESS_KEY_ID": "chaos",
        "ROWSMITH_STORE__S3__SECRET_ACCESS_KEY": "chaos-secret",
        "ROWSMITH_PROVIDER__SIM__BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        "ROWSMITH_PROVIDER__ANTHROPIC__BASE_URL": f"http://127.0.0.1:{sim_port}",
        "ROWSMITH_PROVIDER__OPENAI__TIMEOUT": "2s",
        "ROWSMITH_PROVIDER__ANTHROPIC__TIMEOUT": "2s",
        # The simulator answers no call without a key, as the real APIs do.
        "ANTHROPIC_API_KEY": "sk-ant-chaos",
        "ROWSMITH_CREATION__LEASE": "8s",
        "ROWSMITH_CREATION__UNCONFIRMED_WAIT": "4s",
        "ROWSMITH_POLLER__SCHEDULE": "300ms,600ms,1s",
        "ROWSMITH_INGEST__ACK_WAIT": f"{ACK_WAIT:.0f}s",
        "ROWSMITH_SUBMITTER__ACK_WAIT": f"{ACK_WAIT:.0f}s",
        "ROWSMITH_POLLER__ACK_WAIT": f"{ACK_WAIT:.0f}s",
        "ROWSMITH_MERGER__ACK_WAIT": f"{ACK_WAIT:.0f}s",
        "ROWSMITH_MERGER__MAX_DELIVER": "100",
        "ROWSMITH_INGEST__MAX_DELIVER": "100",
        "ROWSMITH_SIM__ROWS_PER_SECOND": str(args.pace),
        "ROWSMITH_LOG__LEVEL": "info",
    })
    for node in cluster.nodes:
        node.env = env
    bin_dir = args.bin_dir
    rowsmith = os.path.join(bin_dir, "rowsmith")
    sim = Process("provider-sim", [os.path.join(bin_dir, "rowsmith-provider-sim"), "--listen",
                                   f"127.0.0.1:{sim_port}"], env, logs)
    services = [Process(f"{name}-{i}", [os.path.join(bin_dir, f"rowsmith-{name}")], env, logs)
                for i, name in enumerate(SERVICES)]
    everything = cluster.nodes + [moto, sim] + services
    job_id = f"chaos-{args.provider}"
    try:
        cluster.start()
        sim.start()
        wait_port(sim_port)
        sim_faults(sim_port, LOST_AS[0])
        # First as an older deployment with one replica, then with three: setup must raise
        # the KV bucket's replicas too, and no client command may lower them again.
        for count in ("1", "3"):
            for attempt in range(30):
                setup = subprocess.run([rowsmith, "setup"], env={**env, "ROWSMITH_NATS__REPLICAS": count},
                                       capture_output=True, text=True, timeout=60)
                if setup.returncode == 0:
                    break
                time.sleep(1)  # the cluster elects its meta leader
            else:
                raise SystemExit(f"chaos: rowsmith setup failed: {setup.stderr}")
        subprocess.run([rowsmith, "list"], env={**env, "ROWSMITH_NATS__REPLICAS": "1"},
                       capture_output=True, text=True, timeout=60)
        replicas_at_start = nats_call(env["ROWSMITH_NATS__URL"], replicas)
        for service in services:
            service.start()
        table = write_table(os.path.join(work, "input.csv"), args.rows)
        submit = subprocess.run(
            [rowsmith, "submit", table, "--job-id", job_id, "--provider", args.provider,
             "--instructions", "Write a title and pick a category.", "--target", "description",
             "--field", "title:string", "--field", "category:enum(toys|tools|garden)",
             "--max-requests-per-batch", str(args.batch)],
            env=env, capture_output=True, text=True, timeout=120)
        if submit.returncode != 0:
            raise SystemExit(f"chaos: submit failed: {submit.stderr}")

        kills = stalls = store_outages = leader_kills = 0
        stalled = []  # (process, popen, resume at)
        store_back_at = None
        node_back = None  # (node, restart at)
        rotations = 0
        next_kill = time.time() + args.interval
        next_stall = time.time() + args.interval * 1.5
        next_rotation = time.time() + 8
        store_outage_at = time.time() + args.interval * 4
        leader_kill_at = time.time() + args.interval * 7
        state = None
        record = {}
        while time.time() - started < args.timeout:
            now = time.time()
            for entry in list(stalled):
                process, popen, resume_at = entry
                if now >= resume_at:
                    if popen.poll() is None:
                        popen.send_signal(signal.SIGCONT)
                    stalled.remove(entry)
            if store_back_at and now >= store_back_at:
                moto.popen.send_signal(signal.SIGCONT)
                store_back_at = None
            if node_back and now >= node_back[1]:
                node_back[0].start()
                node_back = None
            status = subprocess.run([rowsmith, "status", job_id, "--json"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if status.returncode == 0:
                record = json.loads(status.stdout)
                state = record["state"]
                if state in ("completed", "failed", "cancelled") and not stalled:
                    break
            for service in services:
                if not service.alive():
                    service.start()
            if now >= next_rotation:
                rotations += 1
                sim_faults(sim_port, LOST_AS[rotations % len(LOST_AS)])
                next_rotation = now + 8
            if store_outages == 0 and now >= store_outage_at:
                moto.popen.send_signal(signal.SIGSTOP)
                store_back_at = now + 20
                store_outages += 1
            if leader_kills == 0 and now >= leader_kill_at and node_back is None:
                leader = nats_call(env["ROWSMITH_NATS__URL"], stream_leader)
                if leader:
                    node = cluster.node(leader)
                    node.kill9()
                    node_back = (node, now + 3)
                    leader_kills += 1
            if stalls < args.stalls and now >= next_stall:
                candidates = [s for s in services if s.alive() and all(s is not p for p, _, _ in stalled)]
                if candidates:
                    victim = rng.choice(candidates)
                    victim.popen.send_signal(signal.SIGSTOP)
                    stalled.append((victim, victim.popen, now + stall_seconds))
                    stalls += 1
                next_stall = now + args.interval * rng.uniform(1.5, 3.0)
            if kills < args.kills and now >= next_kill:
                least = min(s.kills for s in services)
                victim = rng.choice([s for s in services if s.kills == least] if least < 2 else services)
                victim.kill9()
                time.sleep(0.2)
                victim.start()
                kills += 1
                next_kill = now + args.interval * rng.uniform(0.5, 1.5)
            time.sleep(0.3)
        seconds = time.time() - started
        for process, popen, _ in stalled:
            if popen.poll() is None:
                popen.send_signal(signal.SIGCONT)
        if store_back_at:
            moto.popen.send_signal(signal.SIGCONT)
        if node_back:
            node_back[0].start()

        failures = []
        if state != "completed":
            failures.append(f"job ended {state!r}, not completed: {record.get('error')}")
        out = os.path.join(work, "out")
        result = subprocess.run([rowsmith, "result", job_id, "--out", out], env=env,
                                capture_output=True, text=True, timeout=120)
        seen = {}
        if result.returncode == 0:
            if not all(whole_csv(os.path.join(out, name)) for name in ("enriched.csv", "failures.csv")):
                failures.append("an output file is not whole")
            with open(os.path.join(out, "manifest.json")) as f:
                json.load(f)
            seen = rows_seen(out)
        else:
            failures.append(f"no result: {result.stderr.strip()}")
        exactly_once = rows_exactly_once(seen, args.rows, failures)
        with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/sim/stats", timeout=10) as answer:
            stats = json.load(answer)
        shards = nats_call(env["ROWSMITH_NATS__URL"], shard_records, default=None)
        if shards is None:
            failures.append("could not read the shard records")
            shards = []
        shards = [s for s in shards if s["key"]["job_id"] == job_id]
        orphans_reported = sum(len(s.get("orphan_batches", [])) for s in shards)
        if args.provider == "sim":
            duplicate_batches = sum(count - 1 for count in stats["batches_per_shard"].values())
        else:
            resubmitted = sum(s.get("resubmissions", 0) for s in shards)
            duplicate_batches = stats["batches_created"] - len(shards) - resubmitted
        orphans_unreported = max(0, duplicate_batches - orphans_reported)
        if orphans_unreported:
            failures.append(f"{orphans_unreported} extra batches were not reported")
        if duplicate_batches > stats["batches_cancelled"]:
            failures.append(f"{duplicate_batches} extra batches, {stats['batches_cancelled']} cancelled")
        lost = stats["create_responses_lost"]
        if lost == 0:
            failures.append("no create answer was lost")
        if kills < args.kills:
            failures.append(f"the job ended after {kills} of {args.kills} kills; slow the pace (--pace)")
        if stalls < args.stalls:
            failures.append(f"the job ended after {stalls} of {args.stalls} stalls")
        if replicas_at_start != [3, 3, 3]:
            failures.append(f"streams and KV bucket have {replicas_at_start} replicas, not 3 each")
        if store_outages != 1 or leader_kills != 1:
            failures.append(f"store outages {store_outages}, leader kills {leader_kills}: both must be 1")
        print(f"chaos: provider={args.provider} kills={kills} stalls={stalls} lost_responses={lost} "
              f"store_outages={store_outages} nats_leader_kills={leader_kills} rows={args.rows} "
              f"rows_exactly_once={'yes' if exactly_once else 'no'} "
              f"duplicate_batches={duplicate_batches} orphans_unreported={orphans_unreported} "
              f"seconds={seconds:.0f}")
        if failures:
            print(f"chaos: FAILED ({'; '.join(failures)}); seed {seed}; logs in {logs}", file=sys.stderr)
            return 1
        return 0
    finally:
        for process in reversed(everything):
            if process.alive():
                process.popen.send_signal(signal.SIGCONT)
            process.stop()


if __name__ == "__main__":
    sys.exit(main())
