"""The slow tier's read speed against the number of concurrent readers and the read size.

    python tools/bench_disk.py FILE [--blocks 4MiB,16MiB] [--threads 1,2,4] [--seconds 3]

Random aligned O_DIRECT reads of FILE (e.g. a packed model's experts.bin), as the engine's reader
threads do them; each setting twice, alternated, so that drift shows. On the VM of
docs/performance.md a second reader was never faster than one (at times it halved the total),
hence the engine's default of one reader (`--readers`).
"""

import argparse

from lowmoe.cli.benchmark import read_bandwidth

UNITS = {"KiB": 2**10, "MiB": 2**20}


def size(text):
    return int(text[:-3]) * UNITS[text[-3:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--blocks", default="4MiB,16MiB")
    ap.add_argument("--threads", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    settings = [(b, int(t)) for b in args.blocks.split(",") for t in args.threads.split(",")]
    results = {s: [] for s in settings}
    for _ in range(2):
        for block, threads in settings:
            results[(block, threads)].append(read_bandwidth(args.file, size(block), args.seconds, threads))
    print("| read size | readers | GB/s (both rounds) |")
    print("|---|---|---|")
    for (block, threads), gbs in results.items():
        print(f"| {block} | {threads} | {' / '.join(f'{g:.2f}' for g in gbs)} |")


if __name__ == "__main__":
    main()
