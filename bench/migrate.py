"""``cairn migrate`` local → S3 (SeaweedFS) against ``rclone copy`` of the same directory.

    python -m bench.migrate [--corpus default] [--transfers 5] [--pack-size MiB] [--work DIR]

The corpus (bench/corpus.py) is backed up once into a local repository
(``DIR/repo-<corpus>-<pack size>``, kept for later runs). Each run starts a fresh
SeaweedFS (``weed mini``, as bench/latency.py starts it), then copies that repository's
directory to it twice, into empty prefixes of one bucket, at the same number of
transfers: ``cairn migrate`` (which also hashes every object and reads back 1 %) and
``rclone copy`` (which compares sizes and times only). The line printed gives wall time,
throughput and the peak memory of each process tree (bench.measure), and the ratio
rclone time / cairn time (≥ 1: cairn is as fast). ``--pack-size 4`` makes a repository
of many small packs, to show that memory does not grow with the number of objects.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bench.corpus import ensure_pristine
from bench.latency import S3_BUCKET, S3_KEY, S3_SECRET, S3Server
from bench.measure import Command, Measurement, run_one, tree_count, tree_size

PASSWORD = "cairn-bench-password"
CAIRN_MAIN = "import sys; from cairn.cli.early import main; sys.argv[0] = 'cairn'; sys.exit(main())"


def _env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env |= {
        "HOME": str(work / "home"),
        "XDG_CACHE_HOME": str(work / "cache"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
    return env


def _cairn(repo: Path, pwfile: Path, *args: str) -> tuple[str, ...]:
    base = (sys.executable, "-c", CAIRN_MAIN, "-r", str(repo), "--password-file", str(pwfile))
    return (*base, *args)


def prepare(work: Path, corpus: str, pack_size: int) -> Path:
    """The local repository of ``corpus`` (backed up once, then reused)."""
    src = work / f"corpus-{corpus}"
    repo = work / f"repo-{corpus}-{pack_size}"
    pwfile = work / "password"
    pwfile.write_text(PASSWORD)
    if (repo / ".backed-up").exists():
        return repo
    ensure_pristine(src, corpus)
    shutil.rmtree(repo, ignore_errors=True)
    log = work / "prepare.log"
    for args in (("init",), ("--pack-size", str(pack_size), "backup", ".")):
        m = run_one(Command(_cairn(repo, pwfile, *args), cwd=src), _env(work), log, 3600)
        if not m.ok:
            raise SystemExit(f"cairn {args[-1]} failed: {m.error} (see {log})")
    (repo / ".backed-up").touch()
    return repo


def run(
    work: Path, repo: Path, transfers: int, tag: str, to_options: list[str]
) -> tuple[Measurement, Measurement]:
    """Both copies into a fresh SeaweedFS; (cairn, rclone)."""
    server_root = work / "weed"
    shutil.rmtree(server_root, ignore_errors=True)
    server = S3Server(server_root, work / "weed.log")
    try:
        endpoint = f"http://127.0.0.1:{server.port}"
        env = _env(work)
        log = work / f"{tag}.log"
        cairn = _cairn(
            repo, work / "password", "--connections", str(transfers), "--no-progress",
            "migrate", "--to", f"s3:{endpoint}/{S3_BUCKET}/cairn-{tag}",
            "--to-option", "s3.region=us-east-1",
            *(f"--to-option={o}" for o in to_options),
        )  # fmt: skip
        m_cairn = run_one(Command(cairn), env, log, 3600)
        remote = (
            f":s3,provider=Other,endpoint='{endpoint}',access_key_id={S3_KEY},"
            f"secret_access_key={S3_SECRET},region=us-east-1:{S3_BUCKET}/rclone-{tag}"
        )
        rclone = (
            shutil.which("rclone") or str(Path(sys.executable).parent / "rclone"),
            "copy", "--config", "/dev/null", "--transfers", str(transfers),
            "--exclude", ".backed-up", "--exclude", "locks/**", str(repo), remote,
        )  # fmt: skip
        m_rclone = run_one(Command(rclone), env, log, 3600)
    finally:
        server.close()
    return m_cairn, m_rclone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="default")
    parser.add_argument("--transfers", type=int, default=5)
    parser.add_argument("--pack-size", type=int, default=16, help="MiB (4-128)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cairn-bench-migrate"))
    parser.add_argument(
        "--to-option", action="append", default=[], help="passed on to cairn migrate"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    repo = prepare(args.work, args.corpus, args.pack_size)
    size = tree_size(repo)
    files, _dirs = tree_count(repo)
    print(f"repository: {repo} ({size / 2**20:.0f} MiB, {files} files), {args.transfers} transfers")
    print(f"{'tool':7} {'time s':>7} {'MiB/s':>7} {'cpu s':>6} {'peak MiB':>9}")
    for rep in range(args.reps):
        results = run(args.work, repo, args.transfers, f"r{rep}", args.to_option)
        for tool, m in zip(("cairn", "rclone"), results, strict=True):
            note = "" if m.ok else f"  FAILED: {m.error}"
            print(
                f"{tool:7} {m.wall_s:7.2f} {size / 2**20 / m.wall_s:7.1f} {m.cpu_s:6.1f} "
                f"{m.peak_bytes / 2**20:9.1f}{note}",
                flush=True,
            )
        print(f"throughput ratio cairn/rclone: {results[1].wall_s / results[0].wall_s:.2f}x")


if __name__ == "__main__":
    main()
