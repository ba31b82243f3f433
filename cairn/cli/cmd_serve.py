"""``cairn serve``: serve repositories over restic's REST protocol (see docs/serve.md)."""

from __future__ import annotations

import dataclasses
import ipaddress
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cairn.cli.common import run_async
from cairn.cli.errors import EXIT_OK, UsageError
from cairn.config.settings import Settings

if TYPE_CHECKING:
    from cairn.serve.auth import Htpasswd
    from cairn.serve.store import StoreOptions


#: Temporary upload files older than this, found at start, were left by a server that
#: was killed mid-upload (a live upload writes to its file continuously).
STALE_TEMPORARY_SECONDS = 3600


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT``; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    host = host.strip("[]")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


@click.command("serve")
@click.option(
    "--path",
    "path",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the repositories (created if missing).",
)
@click.option(
    "--listen",
    default="127.0.0.1:8000",
    show_default=True,
    help="Address to listen on, HOST:PORT (port 0: any free port).",
)
@click.option(
    "--append-only", is_flag=True, help="Refuse deleting and overwriting anything but locks."
)
@click.option(
    "--htpasswd-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Users and bcrypt passwords (htpasswd -B); reloaded when it changes.",
)
@click.option(
    "--private-repos", is_flag=True, help="A user reaches only repositories under /USER/."
)
@click.option(
    "--no-auth", is_flag=True, help="Serve without authentication (required to do so off loopback)."
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TLS certificate (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key", type=click.Path(dir_okay=False, path_type=Path), help="TLS private key (PEM)."
)
@click.option("--max-size", help="Quota per repository, e.g. 500G.")
@click.option(
    "--no-verify-upload",
    is_flag=True,
    help="Do not check that uploads match their names (SHA-256 or BLAKE3).",
)
@click.option("--prometheus-no-auth", is_flag=True, help="Serve /metrics without authentication.")
@click.pass_obj
def command(
    settings: Settings,
    path: Path,
    listen: str,
    append_only: bool,
    htpasswd_file: Path | None,
    private_repos: bool,
    no_auth: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_size: str | None,
    no_verify_upload: bool,
    prometheus_no_auth: bool,
) -> int:
    """Serve repositories over the REST protocol, for cairn and restic clients."""
    from cairn.serve.store import StoreOptions

    host, port = parse_listen(listen)
    if htpasswd_file is not None and no_auth:
        raise UsageError("--no-auth and --htpasswd-file contradict each other")
    if private_repos and htpasswd_file is None:
        raise UsageError("--private-repos needs --htpasswd-file (users to tell apart)")
    if htpasswd_file is None and not no_auth and not is_loopback(host):
        raise UsageError(
            f"refusing to serve {host} without authentication: "
            "give --htpasswd-file, or --no-auth if that is really meant"
        )
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    limit = None
    if max_size is not None:
        from cairn.stages.units import parse_size

        try:
            limit = parse_size(max_size)
        except ValueError as exc:
            raise UsageError(f"--max-size: {exc}") from None
    options = StoreOptions(append_only=append_only, verify=not no_verify_upload, max_size=limit)
    _log_access_by_default(settings)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from None
    path = path.resolve()
    from cairn.serve.auth import Htpasswd

    htpasswd = Htpasswd(htpasswd_file) if htpasswd_file is not None else None

    async def main() -> int:
        await _serve(
            path,
            host,
            port,
            options,
            htpasswd,
            private_repos,
            prometheus_no_auth,
            _tls(tls_cert, tls_key),
        )
        return EXIT_OK

    return run_async(main)


def _log_access_by_default(settings: Settings) -> None:
    """Access logs are info events: show them unless -q or --log-level says otherwise."""
    from cairn.cli.logsetup import configure_logging

    if settings.log_level is None and not settings.quiet and settings.verbosity == 0:
        configure_logging(dataclasses.replace(settings, verbosity=1), "serve")


def _tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return context


async def _serve(
    path: Path,
    host: str,
    port: int,
    options: StoreOptions,
    htpasswd: Htpasswd | None,
    private_repos: bool,
    prometheus_no_auth: bool,
    tls: ssl.SSLContext | None,
) -> None:
    import anyio
    import structlog
    from aiohttp import web

    from cairn.serve.app import make_app
    from cairn.serve.store import Store

    log = structlog.get_logger("cairn.serve")
    store = Store(path, options)
    app = make_app(
        store,
        htpasswd,
        private_repos=private_repos,
        prometheus_no_auth=prometheus_no_auth,
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False, read_bufsize=1 << 21)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        url = f"{'https' if tls else 'http'}://{shown}:{bound[1]}/"
        log.info(
            "serve.listening",
            url=url,
            path=str(path),
            append_only=options.append_only,
            auth=htpasswd is not None,
            private_repos=private_repos,
        )
        click.echo(f"serving {path} on {url}", nl=True)
        removed = await store.sweep_stale(STALE_TEMPORARY_SECONDS)
        if removed:
            log.info("serve.stale_temporaries_removed", count=removed)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
