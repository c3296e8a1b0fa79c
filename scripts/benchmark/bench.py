#!/usr/bin/env python3
"""rowsmith's data-plane benchmark (run through scripts/bench). Times each step as its own
process and reads its peak RSS from wait4(), prints one table, writes BENCHMARKS.md."""
import argparse
import csv
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ["--field", "seo_title:string:SEO title of at most 60 characters",
          "--field", "shelf:string:the best shelf", "--field", "tags:array:3 to 5 keywords"]
INSTRUCTIONS = "Write an SEO title of at most 60 characters, pick a category and 3-5 tags."


def run(argv, env=None, cwd=None):
    """Runs argv; returns (seconds, peak RSS in MiB, stdout+stderr)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench: {' '.join(argv[:3])} failed ({code}):\n{text[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, text


def products(rows, cache, duplicates=0.0):
    suffix = f"-dup{int(duplicates * 100)}" if duplicates else ""
    path = os.path.join(cache, f"products-{rows}{suffix}.csv")
    if not os.path.exists(path):
        print(f"bench: generating {path}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/benchmark/make_products.py"), str(rows), path + ".tmp",
                        "--duplicates", str(duplicates)], check=True)
        os.rename(path + ".tmp", path)
    return path


def articles(rows, cache):
    path = os.path.join(cache, f"articles-{rows}.csv")
    if not os.path.exists(path):
        print(f"bench: generating {path}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/benchmark/make_articles.py"), str(rows), path + ".tmp"],
                       check=True)
        os.rename(path + ".tmp", path)
    return path


def long_cells(render, merge_bench, cache, add):
    """100,000 articles with 5-20 KB bodies: the render path (ingest's indexing and rendering)
    and the merge path (validation, finalize), each within 1 GiB."""
    table = articles(100_000, cache)
    out_dir = tempfile.mkdtemp(prefix="rowsmith-render.")
    seconds, rss, _ = run([render, "render", table, "--instructions", "Summarize the article.", "--target", "description",
                           *FIELDS, "--out-dir", out_dir])
    subprocess.run(["rm", "-rf", out_dir])
    add("rowsmith render, articles with 5-20 KB bodies", 100_000, seconds, rss, os.path.getsize(table),
        "peak RSS <= 1 GiB", "yes" if rss <= 1024 else "no")
    work = tempfile.mkdtemp(prefix="rowsmith-merge.")
    run([merge_bench, "prepare", table, work])
    seconds, rss, _ = run([merge_bench, "merge", work])
    subprocess.run(["rm", "-rf", work])
    add("merge to enriched CSV + Parquet, articles with 5-20 KB bodies", 100_000, seconds, rss, os.path.getsize(table),
        "peak RSS <= 1 GiB", "yes" if rss <= 1024 else "no")


def long_cells_end_to_end(bin_dir, cache, add):
    """The 100,000 articles through every service over NATS: every row comes back (enriched or
    failed), and the four services together stay within 1 GiB."""
    table = articles(100_000, cache)
    seconds, _, services_rss, answered = end_to_end(bin_dir, table, 100_000, "Summarize the article.")
    met = services_rss <= 1024 and answered == 100_000
    add(f"end to end via NATS, articles with 5-20 KB bodies: {answered:,} rows back; peak RSS of all four services in one process",
        100_000, seconds, services_rss, os.path.getsize(table), "every row back, peak RSS <= 1 GiB", "yes" if met else "no")


def print_table(rows_table):
    header = "| step | rows | seconds | rows/s | input MB/s | peak RSS MiB | target | met |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---|---|"]
    for step, rows, seconds, rps, mbps, rss, target, met in rows_table:
        rss_text = "–" if rss != rss else f"{rss:,.0f}"
        mbps_text = "–" if not mbps else f"{mbps:.0f}"
        lines.append(f"| {step} | {rows:,} | {seconds:.2f} | {rps:,.0f} | {mbps_text} | {rss_text} | {target} | {met} |")
    report = "\n".join(lines)
    print(report)
    return report


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid):
    """VmHWM of a running process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def end_to_end(bin_dir, table, rows, instructions=None):
    """`rowsmith enrich` through NATS against `rowsmith up` (all four services in one process)
    and a separate zero-latency simulator. Returns (seconds, the CLI's peak RSS, the services'
    peak RSS, rows in enriched.csv + failures.csv)."""
    work = tempfile.mkdtemp(prefix="rowsmith-bench.")
    port, sim_port = free_port(), free_port()
    env = dict(os.environ, ROWSMITH_NATS__URL=f"nats://127.0.0.1:{port}", ROWSMITH_STORE__URL=f"file://{work}/store",
               ROWSMITH_POLLER__SCHEDULE="100ms", ROWSMITH_SIM__VALIDATING="0s", ROWSMITH_SIM__FINALIZING="0s",
               ROWSMITH_SIM__ROWS_PER_SECOND="100000000", ROWSMITH_LOG__LEVEL="warn",
               ROWSMITH_PROVIDER__SIM__BASE_URL=f"http://127.0.0.1:{sim_port}/v1")
    nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", f"{work}/js"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim = subprocess.Popen([os.path.join(bin_dir, "rowsmith-provider-sim"), "--listen", f"127.0.0.1:{sim_port}"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = None
    try:
        deadline = time.time() + 20
        for wanted in (port, sim_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", wanted), timeout=0.2).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise SystemExit("bench: nats-server or the simulator did not start")
                    time.sleep(0.05)
        subprocess.run([os.path.join(bin_dir, "rowsmith"), "setup"], env=env, check=True, capture_output=True)
        up = subprocess.Popen([os.path.join(bin_dir, "rowsmith"), "up"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "up.log"), "w"))
        time.sleep(1.0)
        out = os.path.join(work, "out")
        seconds, rss, _ = run([os.path.join(bin_dir, "rowsmith"), "enrich", table, "--instructions",
                               instructions or INSTRUCTIONS, "--target", "description", *FIELDS, "--out", out],
                              env=env)
        services_rss = peak_rss_mib(up.pid)
        answered = 0
        for name in ("enriched.csv", "failures.csv"):
            with open(os.path.join(out, name), newline="", encoding="utf-8") as f:
                answered += sum(1 for _ in csv.reader(f)) - 1
        return seconds, rss, services_rss, answered
    finally:
        for process in (up, sim, nats):
            if process:
                process.terminate()
                process.wait()
        subprocess.run(["rm", "-rf", work])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--examples-dir", required=True)
    parser.add_argument("--python", required=True, help="python with duckdb, polars, pydantic for the seed")
    parser.add_argument("--quick", action="store_true", help="skip the 10M-row runs")
    parser.add_argument("--only-long-cells", action="store_true",
                        help="run only the 100k-row long-cell case; print its rows, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "rowsmith", "bench")
    os.makedirs(cache, exist_ok=True)
    render = os.path.join(args.bin_dir, "rowsmith")
    merge_bench = os.path.join(args.examples_dir, "merge_bench")
    seed = os.path.join(ROOT, "..", "shared", "bench", "seed_ingest.py")
    rows_table = []  # (step, rows, seconds, MB/s, peak MiB, target, met)

    def add(step, rows, seconds, rss, input_bytes, target, met):
        rows_table.append((step, rows, seconds, rows / seconds, input_bytes / seconds / 1e6, rss, target, met))

    if args.only_long_cells:
        long_cells(render, merge_bench, cache, add)
        long_cells_end_to_end(args.bin_dir, cache, add)
        print_table(rows_table)
        return

    sizes = [1_000_000] + ([] if args.quick else [10_000_000])
    seed_seconds = None
    one_m = products(1_000_000, cache)
    if os.path.exists(seed):
        out = tempfile.mktemp(suffix=".jsonl")
        seconds, rss, text = run([args.python, seed, one_m, out])
        os.unlink(out)
        seed_seconds = seconds
        add("seed_ingest.py (Python, DuckDB+Polars+pydantic)", 1_000_000, seconds, rss, os.path.getsize(one_m), "baseline", "")
    for rows in sizes:
        table = products(rows, cache)
        out_dir = tempfile.mkdtemp(prefix="rowsmith-render.")
        seconds, rss, text = run([render, "render", table, "--instructions", INSTRUCTIONS, "--target", "description",
                                  *FIELDS, "--out-dir", out_dir])
        subprocess.run(["rm", "-rf", out_dir])
        if rows == 1_000_000:
            speedup = f" ({seed_seconds / seconds:.1f}x seed)" if seed_seconds else ""
            add(f"rowsmith render{speedup}", rows, seconds, rss, os.path.getsize(table), "<= 2.5 s, >= 15x seed",
                "yes" if seconds <= 2.5 and (not seed_seconds or seed_seconds / seconds >= 15) else "no")
        else:
            add("rowsmith render", rows, seconds, rss, os.path.getsize(table), "peak RSS <= 1 GiB", "yes" if rss <= 1024 else "no")
        work = tempfile.mkdtemp(prefix="rowsmith-merge.")
        run([merge_bench, "prepare", table, work])
        seconds, rss, text = run([merge_bench, "merge", work])
        subprocess.run(["rm", "-rf", work])
        if rows == 1_000_000:
            add("merge to enriched CSV + Parquet", rows, seconds, rss, os.path.getsize(table), "<= 10 s", "yes" if seconds <= 10 else "no")
        else:
            add("merge to enriched CSV + Parquet", rows, seconds, rss, os.path.getsize(table), "peak RSS <= 1 GiB", "yes" if rss <= 1024 else "no")
    dup_table = products(100_000, cache, duplicates=0.3)
    import csv as csv_module
    with open(dup_table, newline="", encoding="utf-8") as f:
        rows_read = list(csv_module.reader(f))[1:]
    distinct_sent = len({tuple(r) for r in rows_read if r[5]})
    out_dir = tempfile.mkdtemp(prefix="rowsmith-render.")
    seconds, rss, text = run([render, "render", dup_table, "--instructions", INSTRUCTIONS, "--target", "description",
                              *FIELDS, "--out-dir", out_dir])
    requests = sum(1 for name in os.listdir(out_dir) if name.endswith(".jsonl")
                   for _ in open(os.path.join(out_dir, name), "rb"))
    subprocess.run(["rm", "-rf", out_dir])
    add(f"render, 30% duplicate rows: {requests:,} requests for {distinct_sent:,} distinct rows", len(rows_read),
        seconds, rss, os.path.getsize(dup_table), "requests = distinct rows", "yes" if requests == distinct_sent else "no")
    table = products(100_000, cache)
    seconds, rss, _, _ = end_to_end(args.bin_dir, table, 100_000)
    add("end to end via NATS, zero-latency simulator (enrich)", 100_000, seconds, rss, os.path.getsize(table), "<= 60 s", "yes" if seconds <= 60 else "no")
    long_cells(render, merge_bench, cache, add)
    long_cells_end_to_end(args.bin_dir, cache, add)

    seconds, rss, text = run([os.path.join(args.examples_dir, "poller_bench"), os.path.join(args.bin_dir, "rowsmith-poller"),
                              "10000", "60"])
    fields = dict(part.split("=", 1) for part in text.strip().splitlines()[-1].split()[1:])
    p50, p99, cores = float(fields["lag_p50_ms"]), float(fields["lag_p99_ms"]), float(fields["cpu_cores"])
    rows_table.append((f"one poller, 10,000 in-flight batches, 5 s schedule: {fields['checks']} checks in 60 s, "
                       f"lag p50 {p50:.0f} ms / p99 {p99:.0f} ms, {cores:.2f} cores", 10_000, float(fields["seconds"]),
                       int(fields["checks"]) / float(fields["seconds"]), 0.0, float("nan"),
                       "on schedule, < 1 core", "yes" if cores < 1 and p99 < 5000 else "no"))

    report = print_table(rows_table)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("# Benchmarks\n\nMeasured by `scripts/bench` (release build; each step its own process, peak RSS "
                f"from wait4). Machine: {machine}. Date: {time.strftime('%Y-%m-%d')}.\n\n{report}\n\n"
                "Input: scripts/benchmark/make_products.py (sku, name, brand, category, price, description of 2-5 "
                "sentences with quotes, commas, newlines, unicode; 1% empty). The seed is "
                "../shared/bench/seed_ingest.py on the same 1M-row file. The articles are "
                "scripts/benchmark/make_articles.py (id, headline, section, published, a 5-20 KB body).\n")
        # What the numbers mean (profiles, misses, history) is kept by hand next to this script.
        notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
        if os.path.exists(notes):
            with open(notes) as n:
                f.write("\n" + n.read())


if __name__ == "__main__":
    main()
