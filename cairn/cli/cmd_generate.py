"""``cairn generate``: shell completion scripts and man pages, from the command
definitions themselves (click's completion support, click-man's pages)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cairn.cli.errors import EXIT_OK
from cairn.config.settings import Settings

# The environment variable the completion scripts set when they call cairn back.
COMPLETE_VAR = "_CAIRN_COMPLETE"


def _root() -> click.Group:
    ctx = click.get_current_context()
    root = ctx.find_root().command
    assert isinstance(root, click.Group)
    return root


def _load_all(group: click.Group) -> None:
    """Import every command (they load lazily), so that pages cover them all."""
    ctx = click.Context(group, info_name="cairn")
    for name in group.list_commands(ctx):
        group.get_command(ctx, name)


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    Path(target).write_text(text, encoding="utf-8")


def _completion(shell: str) -> str:
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    source = cls(_root(), {}, "cairn", COMPLETE_VAR).source()
    return source if source.endswith("\n") else source + "\n"


@click.command("generate")
@click.option(
    "--bash-completion", metavar="FILE", help="Write the bash completion script ('-': stdout)."
)
@click.option(
    "--zsh-completion", metavar="FILE", help="Write the zsh completion script ('-': stdout)."
)
@click.option(
    "--fish-completion", metavar="FILE", help="Write the fish completion script ('-': stdout)."
)
@click.option(
    "--man",
    "man_dir",
    metavar="DIR",
    type=click.Path(file_okay=False, writable=True),
    help="Write man pages (cairn.1, cairn-backup.1, ...) into DIR.",
)
@click.pass_obj
def command(
    settings: Settings,
    bash_completion: str | None,
    zsh_completion: str | None,
    fish_completion: str | None,
    man_dir: str | None,
) -> int:
    """Generate shell completion scripts and man pages.

    \b
    Install, for example:
      cairn generate --bash-completion /etc/bash_completion.d/cairn
      cairn generate --zsh-completion "${fpath[1]}/_cairn"
      cairn generate --fish-completion ~/.config/fish/completions/cairn.fish
      cairn generate --man /usr/local/share/man/man1
    """
    wanted = {"bash": bash_completion, "zsh": zsh_completion, "fish": fish_completion}
    if not any(wanted.values()) and man_dir is None:
        raise click.UsageError(
            "nothing to generate: give --bash-completion, --zsh-completion, "
            "--fish-completion or --man"
        )
    for shell, target in wanted.items():
        if target is not None:
            _write(target, _completion(shell))
    if man_dir is not None:
        from click_man.core import write_man_pages

        from cairn import __version__

        root = _root()
        _load_all(root)
        for sub in root.commands.values():
            if isinstance(sub, click.Group):
                _load_all(sub)
        Path(man_dir).mkdir(parents=True, exist_ok=True)
        write_man_pages("cairn", root, version=__version__, target_dir=man_dir)
        if not settings.quiet and not settings.json:
            click.echo(f"man pages written to {man_dir}", err=True)
    return EXIT_OK
