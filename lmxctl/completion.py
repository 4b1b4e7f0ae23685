"""`lmxctl completion bash|zsh`: a completion script made from lmxctl's own parser, so it names
every subcommand and flag there is (model ids come from the running daemon: `lmxctl status --json`)."""

from __future__ import annotations

import argparse


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        out[name] = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))
    return out


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    commands = _commands(parser)
    cases = "\n".join(f'        {name}) opts="{" ".join(flags)}" ;;' for name, flags in sorted(commands.items()))
    body = f"""_lmxctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd=${{COMP_WORDS[1]}} opts
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{' '.join(sorted(commands))}" -- "$cur")); return
    fi
    case "$cmd" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        local models
        models=$(lmxctl status --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["models"]))' 2>/dev/null)
        COMPREPLY=($(compgen -W "$models" -- "$cur"))
    fi
}}
complete -o default -F _lmxctl lmxctl
"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("completion", help="print a shell completion script: eval \"$(lmxctl completion bash)\"")
    c.add_argument("shell", choices=("bash", "zsh"))
