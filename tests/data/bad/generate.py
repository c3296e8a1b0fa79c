#!/usr/bin/env python3
"""Writes the large hostile inputs of tests/data/bad that are too big to commit.

    python3 tests/data/bad/generate.py OUT_DIR [NAME ...]

NAME is any of the cases below (default: all). Every file is written streaming, so the
generator itself needs little memory; the Rust tests build the same shapes in Rust.

  huge_cell.csv        header `sku,description`, one row whose `description` is one 50 MiB
                       cell (no newline inside), then a normal row: a single cell larger than
                       any sane request and than the 200 MB batch limit's per-row share.
  huge_cell.jsonl      the same 50 MiB cell as one JSON line `{"sku": "00501", "description": "xx…"}`
                       (DuckDB's JSON reader has its own 16 MiB object limit). The Parquet
                       variant cannot be written without a Parquet library; make it with DuckDB:
                       COPY (SELECT '00501' AS sku, repeat('x', 52428800) AS description)
                         TO 'huge_cell.parquet' (FORMAT parquet);   -- 2.4 MB file
  wide.csv             10,000 columns (`c0` … `c9998`, then `description`) and 3 rows:
                       the header alone is ~60 KB and every request carries 9,999 context
                       columns unless --context/--no-context is given.
  gzip_bomb.csv.gz     2.4 MB of gzip that expands to 1.1 GiB (1,157,417,884 bytes) of CSV:
                       header `sku,description`, then 1.15 M identical rows `0,` + 1,000 × 'a'
                       (so every request after the first is a duplicate and the shards stay
                       small; the cost is in decompressing, indexing and hashing).
  gzip_bomb_rows.csv.gz  1.1 MB of gzip that expands to 1.1 GiB of tiny identical rows `0,a`
                       (about 290 M rows): stresses per-row bookkeeping (row count, the
                       duplicate map sized by the row count) rather than cell size.
  truncated_real.csv.gz  a real gzip of a 2,000-row CSV cut off in the middle (no trailer):
                       the "download stopped half way" case, unlike the committed
                       truncated.csv.gz whose deflate data is garbage from the start.
"""

import gzip
import os
import sys

MIB = 1024 * 1024


def huge_cell(path):
    with open(path, "wb") as out:
        out.write(b"sku,description\n00501,")
        chunk = b"x" * MIB
        for _ in range(50):
            out.write(chunk)
        out.write(b"\n00502,A normal row after the huge one.\n")


def huge_cell_jsonl(path):
    with open(path, "wb") as out:
        out.write(b'{"sku": "00501", "description": "')
        chunk = b"x" * MIB
        for _ in range(50):
            out.write(chunk)
        out.write(b'"}\n{"sku": "00502", "description": "A normal row after the huge one."}\n')


def wide(path, columns=10_000):
    names = [f"c{i}" for i in range(columns - 1)] + ["description"]
    with open(path, "w", encoding="ascii", newline="") as out:
        out.write(",".join(names) + "\n")
        for row in range(3):
            cells = [str(row * columns + i) for i in range(columns - 1)]
            cells.append(f"row {row}: a product with far too many columns")
            out.write(",".join(cells) + "\n")


def _gzip_stream(path, header, row, total_bytes):
    """Writes header + `row` repeated until `total_bytes` of plain text, gzipped at level 9."""
    block = row * max(1, (4 * MIB) // len(row))
    written = len(header)
    with open(path, "wb") as raw:
        # mtime=0 keeps the output byte-for-byte reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as out:
            out.write(header)
            while written < total_bytes:
                out.write(block)
                written += len(block)
    return written


def gzip_bomb(path):
    # The sku makes each line unique only in its first bytes; keep it constant so that the
    # stream stays highly compressible (~1000:1), like a real bomb.
    _gzip_stream(path, b"sku,description\n", b"0," + b"a" * 1000 + b"\n", 1100 * MIB)


def gzip_bomb_rows(path):
    _gzip_stream(path, b"sku,description\n", b"0,a\n", 1100 * MIB)


def truncated_real(path):
    text = "sku,description\n" + "".join(
        f"{i:05d},Product number {i} with a plain description.\n" for i in range(2000)
    )
    data = gzip.compress(text.encode(), mtime=0)
    with open(path, "wb") as out:
        out.write(data[: len(data) // 2])


CASES = {
    "huge_cell.csv": huge_cell,
    "huge_cell.jsonl": huge_cell_jsonl,
    "wide.csv": wide,
    "gzip_bomb.csv.gz": gzip_bomb,
    "gzip_bomb_rows.csv.gz": gzip_bomb_rows,
    "truncated_real.csv.gz": truncated_real,
}


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out_dir = argv[1]
    names = argv[2:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; cases are: {', '.join(CASES)}", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    for name in names:
        path = os.path.join(out_dir, name)
        CASES[name](path)
        print(f"{path}\t{os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
