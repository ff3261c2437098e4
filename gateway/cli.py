"""`ponder`: the one place that wires every part together.

    ponder serve [--config FILE] [--host H] [--port P]   run the gateway
    ponder train ...                                     retrain the classifier
    ponder classify "TEXT" | --input F --output F        run the classifier
    ponder policy check FILE... | [--config FILE]        validate policies (a config's: together)
    ponder stats ...                                     per-bucket learned stats
    ponder eval ...                                      replay recorded outcomes
    ponder key [--id ID] | --hash                        a new API key and its config line
    ponder version | --version                           the installed version (for bug reports)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before anything can import litellm


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # what both logging and uvicorn accept
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm")


class WithoutUserMedia(logging.Filter):
    """Drops litellm's lines about fetching a user's image or file (for a provider that takes them
    inline, as Claude does an `http://` image): each names its URL, which is part of the prompt (a
    signed URL is a credential), at WARNING and ERROR, where `log_prompts` keeps only debug lines out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.module != "image_handling"


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 meaning any free one (uvicorn logs the one it got). Without the range
    check the socket layer wraps 99999 to 34463 and a negative port fails inside the server's startup."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return port


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ponder serve", description="Run the gateway.")
    parser.add_argument("--config", default=os.environ.get("PONDER_CONFIG"),
                        help="gateway YAML (default: $PONDER_CONFIG, else the embedded local default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000, help="0: any free port (default: 8000)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    args = parser.parse_args(argv)

    import uvicorn

    from gateway.app import create_app
    from gateway.connections import guarded_protocol, raise_open_files_limit
    from gateway.config import ConfigError, load_config
    from gateway.service import Gateway

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        Gateway.check(config)
    except ConfigError as exc:
        print(f"ponder: bad config: {exc}", file=sys.stderr)
        return 2
    if not config.log_prompts:
        # litellm's debug lines print whole requests (messages included): prompts stay out of the logs
        # unless the operator asked for them, whatever the log level.
        for name in LITELLM_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
            logging.getLogger(name).addFilter(WithoutUserMedia())
    raise_open_files_limit(config.max_requests_in_flight)
    # httptools, with limits
    http = guarded_protocol(config.max_header_bytes, config.header_timeout_s, config.body_timeout_s)
    # uvloop, whose listening socket is drained at each turn (gateway/accept.py): a burst of new connections
    # reaches the load shedding instead of waiting in the kernel, one admitted per turn of a busy loop
    uvicorn.run(create_app(config), host=args.host, port=args.port, loop="gateway.accept:new_event_loop", http=http,
                log_level=args.log_level, access_log=False, timeout_graceful_shutdown=config.shutdown_grace_s)
    return 0


def key(argv: list[str]) -> int:
    """A new API key and the `api_keys` line that admits it (the config holds only its sha256), or
    with --hash the sha256 of a key read from stdin (for a key that already exists)."""
    import secrets

    from gateway.config import hash_key

    parser = argparse.ArgumentParser(prog="ponder key", description=key.__doc__)
    parser.add_argument("--id", default="my-app", help="the key's id in the config, telemetry and budgets")
    parser.add_argument("--hash", action="store_true", help="print the sha256 of the key on stdin instead")
    args = parser.parse_args(argv)
    if args.hash:
        text = sys.stdin.read().strip()
        if not text:
            print("ponder key --hash: no key on stdin", file=sys.stderr)
            return 2
        print(hash_key(text))
        return 0
    if not args.id.strip():
        print("ponder key: --id must not be empty", file=sys.stderr)
        return 2
    new_key = "pk-" + secrets.token_urlsafe(32)
    print(f"key (give it to the client; it is not stored anywhere): {new_key}")
    print("config line, under api_keys:")
    # quoted (a JSON string is a YAML one): `--id 2024` or `--id yes` unquoted read back as a number or
    # a boolean, which the config refuses, and `--id "team: web"` as broken YAML
    print(f'  - {{id: {json.dumps(args.id)}, sha256: "{hash_key(new_key)}"}}')
    return 0


def version(argv: list[str]) -> int:
    """The installed package's version, as pip knows it."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    argparse.ArgumentParser(prog="ponder version", description=version.__doc__).parse_args(argv)
    try:
        print(f"ponder {installed_version('ponder')}")
    except PackageNotFoundError:  # sources run without `pip install`
        print("ponder: not installed (no package metadata), so no version to tell", file=sys.stderr)
        return 1
    return 0


def policy_check(argv: list[str]) -> int:
    from policies.loader import check_cli

    return check_cli(argv, config_backends=served_backends, config_policies=served_policies)


def served_backends(path: str) -> list:
    """--config's backends as the gateway serves them: the config's, and the managed local model's
    `local` (a policy naming it passes the check only if serving it would work)."""
    from gateway.config import ConfigError, load_config
    from gateway.service import configured_backends
    from policies.schema import PolicyError

    try:
        return configured_backends(load_config(path))
    except ConfigError as exc:
        raise PolicyError(exc.problems or [(path, None, "", f"not a valid gateway config: "
                                                            f"{str(exc).removeprefix(f'{path}: ')}")]) from None


def served_policies(path: str) -> tuple[list, list[str]]:
    """The policies --config serves, loaded together as `ponder serve` loads them (configured_policies),
    as (file, policy) pairs, default first, and what the gateway would warn about at start."""
    from gateway.config import ConfigError, load_config
    from gateway.service import configured_policies
    from policies.schema import PolicyError

    try:
        config = load_config(path)
    except ConfigError as exc:
        raise PolicyError(exc.problems or [(path, None, "", f"not a valid gateway config: "
                                                            f"{str(exc).removeprefix(f'{path}: ')}")]) from None
    policies = configured_policies(config)
    return [(str(policies.path(name)), policies.get(name).policy) for name in policies.names()], policies.warnings()


def _delegate(module: str, function: str, argv: list[str]) -> int:
    import importlib

    return int(getattr(importlib.import_module(module), function)(argv) or 0)


COMMANDS = {
    "serve": lambda argv: serve(argv),
    "train": lambda argv: _delegate("router.train", "cli", argv),
    "classify": lambda argv: _delegate("router.classifier", "cli", argv),
    "stats": lambda argv: _delegate("telemetry.cli", "stats_cli", argv),
    "eval": lambda argv: _delegate("evals.cli", "cli", argv),
    "key": lambda argv: key(argv),
    "version": lambda argv: version(argv),
}


def main(argv: list[str] | None = None) -> int:
    try:
        status = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # a reader gone shows here, not as "Exception ignored" at exit
        return status
    except BrokenPipeError:
        # The reader stopped early (`ponder stats | head`): stop quietly, as Unix tools do. Python's
        # recipe: stdout to /dev/null, so the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["policy"]:
        # `policy check` is the one policy command: `ponder policy --help` shows its help
        rest = argv[2:] if argv[1:2] == ["check"] else argv[1:] if argv[1:2] in (["-h"], ["--help"]) else None
        if rest is not None:
            return policy_check(rest)
    if argv[:1] == ["--version"]:
        argv[0] = "version"
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)  # asked for: to stdout, so `ponder --help | less` shows it
        return 0
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] == ["policy"]:
            print(f"ponder policy: {'unknown subcommand ' + repr(argv[1]) if argv[1:] else 'no subcommand'}; "
                  "the one there is: ponder policy check FILE... | --config FILE", file=sys.stderr)
        elif argv:
            print(f"ponder: unknown command {argv[0]!r}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
