"""``asrd keys|token|sign-url|config|usage|transcript``: the control plane from a shell.

The commands talk to Redis directly (``[redis] url`` of the config file, or ``--redis-url``);
no gateway needs to run. ``sign-url`` needs no Redis at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import trio
from pydantic import TypeAdapter, ValidationError

from asrd import logs
from asrd.config import Config, ConfigError, DynamicConfig, Name, load_config
from asrd.errors import ClientError
from asrd.store import StoreError, signing
from asrd.store.redisstore import open_redis_store
from asrd.store.repo import AppKey, AppKeyExists, ConfigState, Repository, valid_appkey

DEFAULT_CONFIG = "config.toml"
TRANSCRIPTS_LIMIT = 50  # `asrd transcript --appkey K` lists this many by default


class CommandError(Exception):
    """A command failed for a reason its message explains (exit status 1)."""


def _config(args: argparse.Namespace) -> Config:
    path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    return load_config(path, redis={"url": getattr(args, "redis_url", None)})


def _run(args: argparse.Namespace, fn: Callable[[Repository], Awaitable[int]]) -> int:
    config = _config(args)
    if not config.redis.url:
        raise ConfigError("no Redis configured: set [redis] url in the config file or --redis-url")

    async def main() -> int:
        async with open_redis_store(config.redis) as store:
            return await fn(Repository(store, config.redis))

    try:
        return trio.run(main)
    except (CommandError, StoreError) as exc:
        logs.fatal(str(exc))
        return 1
    except ClientError as exc:
        logs.fatal(exc.reason)
        return 2


def _when(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_LANGUAGE: TypeAdapter[str] = TypeAdapter(Name)


def _languages(value: str) -> list[str]:
    """``--languages``: names a session's ``language`` can have. None at all is refused: an
    empty list allows every language, the opposite of what restricting means."""
    names = [x.strip() for x in value.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("names no language (to allow all, leave it out)")
    for name in names:
        try:
            _LANGUAGE.validate_python(name)
        except ValidationError:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a language: 1 to 64 of A-Z a-z 0-9 _ -"
            ) from None
    return names


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {value!r}")
    return number


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _show_app(app: AppKey, active: int | None = None) -> None:
    print(f"appkey:             {app.appkey}")
    print(f"status:             {app.status}")
    print(f"max_sessions:       {app.max_sessions or 'no limit'}")
    if active is not None:
        print(f"active sessions:    {active}")
    print(f"languages:          {', '.join(app.languages) or 'all'}")
    print(f"record_transcripts: {'on' if app.record_transcripts else 'off'}")
    print(f"description:        {app.description}")
    print(f"created:            {_when(app.created_at)}")


# --- keys ----------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        try:
            app, secret = await repo.create_app(
                args.appkey,
                max_sessions=args.max_sessions,
                languages=args.languages or [],
                record_transcripts=not args.no_transcripts,
                description=args.description or "",
            )
        except AppKeyExists as exc:
            raise CommandError(exc.reason) from None
        if args.json:
            _print_json({**app.public(), "secret": secret})
        else:
            _show_app(app)
            print(f"secret:             {secret}")
            print(
                "\nThe secret is shown only now: Redis keeps only its hash. Store it safely.",
                file=sys.stderr,
            )
        return 0

    return _run(args, fn)


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        apps = await repo.list_apps()
        counts = [await repo.active_sessions(a.appkey) for a in apps]
        if args.json:
            _print_json([{**a.public(), "active": n} for a, n in zip(apps, counts, strict=True)])
            return 0
        print(f"{'appkey':24} {'status':9} {'active':>6} {'limit':>6} {'transcripts':11} languages")
        for a, n in zip(apps, counts, strict=True):
            print(
                f"{a.appkey:24} {a.status:9} {n:>6} {a.max_sessions or '-':>6} "
                f"{'on' if a.record_transcripts else 'off':11} {','.join(a.languages) or 'all'}"
            )
        return 0

    return _run(args, fn)


async def _need_app(repo: Repository, appkey: str) -> AppKey:
    app = await repo.get_app(appkey)
    if app is None:
        raise CommandError(f"appkey {appkey!r} does not exist")
    return app


def cmd_keys_show(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        app = await _need_app(repo, args.appkey)
        active = await repo.active_sessions(app.appkey)
        if args.json:
            _print_json({**app.public(), "active": active})
        else:
            _show_app(app, active)
        return 0

    return _run(args, fn)


def cmd_keys_update(args: argparse.Namespace) -> int:
    status = {"disable": "disabled", "enable": "active"}.get(args.keys_command)
    languages = None
    if getattr(args, "all_languages", False):
        languages = []
    elif getattr(args, "languages", None) is not None:
        languages = args.languages
    transcripts = getattr(args, "transcripts", None)

    async def fn(repo: Repository) -> int:
        app = await repo.update_app(
            args.appkey,
            status=status,  # type: ignore[arg-type]
            max_sessions=getattr(args, "max_sessions", None),
            languages=languages,
            record_transcripts=None if transcripts is None else transcripts == "on",
            description=getattr(args, "description", None),
        )
        if app is None:
            raise CommandError(f"appkey {args.appkey!r} does not exist")
        _show_app(app)
        return 0

    return _run(args, fn)


def cmd_keys_delete(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        if not await repo.delete_app(args.appkey):
            raise CommandError(f"appkey {args.appkey!r} does not exist")
        print(f"deleted appkey {args.appkey} (its tokens no longer work; usage is kept)")
        return 0

    return _run(args, fn)


# --- tokens and links ----------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        if args.revoke is not None:
            if args.appkey:  # it would be ignored: a token names its own key
                raise ClientError("--revoke TOKEN takes no APPKEY")
            if not await repo.revoke_token(args.revoke):
                raise CommandError("no such token (expired, revoked or never issued)")
            print("token revoked")
            return 0
        if not args.appkey:
            raise ClientError("name the APPKEY to issue a token for (or --revoke TOKEN)")
        app = await _need_app(repo, args.appkey)
        if not app.active:
            raise CommandError(f"appkey {app.appkey!r} is disabled")
        max_ttl = repo.config.token_ttl_s
        if args.ttl is not None and not 1 <= args.ttl <= max_ttl:
            raise ClientError(f"--ttl must be 1 to {max_ttl} s ([redis] token_ttl_s)")
        ttl = args.ttl or max_ttl
        token, info = await repo.issue_token(app, ttl)
        if args.json:
            _print_json(  # the fields of POST /token's answer
                {
                    "token": token,
                    "appkey": app.appkey,
                    "expires_at": int(info.expires_at),
                    "expires_in": ttl,
                }
            )
        else:
            print(token)
            print(f"expires {_when(info.expires_at)} (in {ttl} s)", file=sys.stderr)
        return 0

    return _run(args, fn)


def cmd_sign_url(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get("ASRD_SECRET")
    if not secret:
        logs.fatal("give the app key's secret with --secret or ASRD_SECRET")
        return 2
    # A link the gateway could never accept is refused here, not at its first use.
    if not valid_appkey(args.appkey):
        logs.fatal(f"--appkey {args.appkey!r} is not an app key's name")
        return 2
    if args.ts is not None and not 0 <= args.ts < 10**12:
        logs.fatal(f"--ts {args.ts}: unix seconds, 0 to {10**12 - 1}")
        return 2
    try:
        url = signing.sign_url(
            args.url,
            appkey=args.appkey,
            secret=secret,
            ts=args.ts,
            nonce=args.nonce,
            method=args.method,
        )
    except ValueError as exc:
        logs.fatal(str(exc))
        return 2
    print(url)
    return 0


# --- live configuration --------------------------------------------------------------------


def _set_path(data: dict[str, Any], path: str, value: Any, *, remove: bool = False) -> None:
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ClientError(f"{path!r}: name a key as section.key (e.g. routing.languages.en-US)")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise CommandError(f"{path!r}: {part!r} is not a table")
        node = child
    if remove:
        if parts[-1] not in node:
            raise CommandError(f"{path!r} is not set")
        del node[parts[-1]]
    else:
        node[parts[-1]] = value


def _get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CommandError(f"{path!r} is not set")
        node = node[part]
    return node


def _validated(data: dict[str, Any]) -> DynamicConfig:
    try:
        return DynamicConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc


def _readable(state: ConfigState) -> ConfigState:
    if state.error:
        # Gateways and workers ignore it and keep the routing they had: neither "none"
        # (config.toml) nor a document built on top of it would be the truth.
        raise CommandError(
            f"the stored configuration is invalid, so gateways and workers ignore it: "
            f"{state.error}\nreplace it (asrd config load FILE) or delete it "
            "(asrd config reset)"
        )
    return state


def _print_saved(rev: str, doc: DynamicConfig) -> None:
    print(f"live configuration saved (revision {rev}):")
    _print_json(doc.model_dump(mode="json"))


def cmd_config(args: argparse.Namespace) -> int:
    loaded: dict[str, Any] = {}
    if args.config_command == "load":
        try:
            text = Path(args.file).read_text()
            loaded = json.loads(text) if args.file.endswith(".json") else tomllib.loads(text)
        except (OSError, ValueError) as exc:  # TOMLDecodeError and JSONDecodeError too
            logs.fatal(f"cannot read {args.file}: {exc}")
            return 2

    async def fn(repo: Repository) -> int:
        action = args.config_command
        if action in ("show", "get"):
            state = _readable(await repo.load_config())
            if state.doc is None:
                none = "no live configuration in Redis: gateways and workers use their config.toml"
                if action == "get":  # a failure, told as every other (a JSON line with --log-json)
                    raise CommandError(none)
                print(none, file=sys.stderr)
                return 0
            data = state.doc.model_dump(mode="json")
            _print_json(data if action == "show" else _get_path(data, args.key))
            return 0
        if action == "reset":
            rev = await repo.save_config(None)
            print(f"live configuration deleted (revision {rev}); config.toml applies again")
            return 0
        if action == "load":
            doc = _validated(loaded)
            _print_saved(await repo.save_config(doc), doc)
            return 0

        # set, unset: one key of the stored document; redone if another change came first
        def change(state: ConfigState) -> DynamicConfig:
            data = json.loads(json.dumps(_readable(state).raw))  # a deep copy
            if action == "set":
                try:
                    value = json.loads(args.value)
                except ValueError:
                    value = args.value
                _set_path(data, args.key, value)
            else:
                _set_path(data, args.key, None, remove=True)
            return _validated(data)

        saved = await repo.change_config(change)
        if saved is None:
            raise CommandError(
                "the live configuration kept being changed by others while this command tried "
                "to change it; nothing was saved, run it again"
            )
        _print_saved(*saved)
        return 0

    return _run(args, fn)


# --- records -------------------------------------------------------------------------------


def cmd_usage(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        rows = await repo.usage(args.appkey, args.since)
        if args.json:
            _print_json([dataclasses.asdict(r) for r in rows])
            return 0
        print(
            f"{'day':10} {'appkey':24} {'sessions':>8} {'errors':>6} {'audio_s':>10} "
            f"{'duration_s':>10} {'lost_transcripts':>16}"
        )
        for r in rows:
            print(
                f"{r.day:10} {r.appkey:24} {r.sessions:>8} {r.errors:>6} {r.audio_s:>10.1f} "
                f"{r.duration_s:>10.1f} {r.lost_transcripts:>16}"
            )
        return 0

    return _run(args, fn)


def _print_transcript(doc: dict[str, Any]) -> None:
    print(
        f"task {doc['task_id']}  session {doc['session_id']}  appkey {doc['appkey']}  "
        f"language {doc.get('language')} (pool {doc.get('pool')})"
    )
    print(
        f"started {_when(doc['started_at'])}  duration {doc['duration_s']:.1f} s  "
        f"audio {doc['audio_s']:.1f} s  outcome {doc['code']} {doc['reason']}"
    )
    print(f"params {json.dumps(doc.get('params', {}), sort_keys=True)}")
    for s in doc.get("sentences", []):
        print(f"[{s['begin_time'] / 1000:.2f}-{s['time'] / 1000:.2f}] {s['text']}")


def cmd_transcript(args: argparse.Namespace) -> int:
    async def fn(repo: Repository) -> int:
        if args.task_id:
            if args.since is not None or args.limit is not None:  # they would be ignored
                raise ClientError("--since and --limit list a key's transcripts: use --appkey K")
            docs = await repo.transcript(args.task_id)
            if args.appkey:
                docs = [d for d in docs if d.get("appkey") == args.appkey]
            if not docs:
                raise CommandError(
                    f"no transcript of task {args.task_id} (unknown, expired, or not recorded)"
                )
            if args.json:
                _print_json(docs)
            else:
                for i, doc in enumerate(docs):
                    if i:
                        print()
                    _print_transcript(doc)
            return 0
        if not args.appkey:
            raise ClientError("give a TASK_ID, or --appkey K to list a key's transcripts")
        limit = TRANSCRIPTS_LIMIT if args.limit is None else args.limit
        docs = await repo.transcripts(args.appkey, since=args.since, limit=limit)
        if args.json:
            _print_json(docs)
            return 0
        for d in docs:
            text = " ".join(s["text"] for s in d.get("sentences", []))
            print(
                f"{_when(d['ended_at'])}  {d['task_id']}  {d['code']}  "
                f"{d['audio_s']:7.1f} s  {text[:60]}"
            )
        return 0

    return _run(args, fn)


# --- parsers -------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML file (default: ./config.toml if present)")
    common.add_argument("--redis-url", help="overrides [redis] url, e.g. redis://127.0.0.1:6379/0")

    keys = sub.add_parser("keys", help="app keys: create, list, show, update, disable, delete")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", parents=[common], help="create a key; prints its secret once")
    c.add_argument("appkey", nargs="?", help="the key's name (default: random)")
    c.add_argument("--max-sessions", type=int, default=10, help="concurrent sessions (0: no limit)")
    c.add_argument(
        "--languages", type=_languages, help="allowed languages, comma separated (default: all)"
    )
    c.add_argument("--no-transcripts", action="store_true", help="do not record transcripts")
    c.add_argument("--description")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_keys_create)
    ls = ksub.add_parser("list", parents=[common], help="every key with its active sessions")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_keys_list)
    sh = ksub.add_parser("show", parents=[common], help="one key")
    sh.add_argument("appkey")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_keys_show)
    up = ksub.add_parser("update", parents=[common], help="change a key's limits or settings")
    up.add_argument("appkey")
    up.add_argument("--max-sessions", type=int)
    langs = up.add_mutually_exclusive_group()
    langs.add_argument("--languages", type=_languages, help="allowed languages, comma separated")
    langs.add_argument("--all-languages", action="store_true", help="allow every language")
    up.add_argument("--transcripts", choices=("on", "off"), help="record transcripts")
    up.add_argument("--description")
    up.set_defaults(func=cmd_keys_update)
    for name, text in (("disable", "refuse new sessions"), ("enable", "accept sessions again")):
        p = ksub.add_parser(name, parents=[common], help=text)
        p.add_argument("appkey")
        p.set_defaults(func=cmd_keys_update)
    d = ksub.add_parser("delete", parents=[common], help="delete a key (usage is kept)")
    d.add_argument("appkey")
    d.set_defaults(func=cmd_keys_delete)

    t = sub.add_parser("token", parents=[common], help="issue (or revoke) an access token")
    t.add_argument("appkey", nargs="?")
    t.add_argument(
        "--ttl", type=int, help="lifetime in seconds (default and maximum: [redis] token_ttl_s)"
    )
    t.add_argument("--revoke", metavar="TOKEN", help="revoke this token instead")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_token)

    s = sub.add_parser("sign-url", help="sign a WebSocket URL with an app key's secret")
    s.add_argument("url", help="e.g. ws://127.0.0.1:8080/ws/v1")
    s.add_argument("--appkey", required=True)
    s.add_argument("--secret", help="the key's secret (default: $ASRD_SECRET)")
    s.add_argument("--ts", type=int, help="unix seconds (default: now)")
    s.add_argument("--nonce", help="8-64 of A-Z a-z 0-9 _ - (default: random)")
    s.add_argument("--method", default="GET")
    s.set_defaults(func=cmd_sign_url)

    cfg = sub.add_parser("config", help="the live configuration (routing) kept in Redis")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("show", parents=[common], help="print the live configuration")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("get", parents=[common], help="print one key, e.g. routing.languages")
    p.add_argument("key")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("set", parents=[common], help="set one key (VALUE: JSON or a string)")
    p.add_argument("key", help="e.g. routing.languages.en-GB")
    p.add_argument("value", help='e.g. en-US, or {"en-US": "en-US"}')
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("unset", parents=[common], help="remove one key")
    p.add_argument("key")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("load", parents=[common], help="replace it with a TOML or JSON file")
    p.add_argument("file")
    p.set_defaults(func=cmd_config)
    p = csub.add_parser("reset", parents=[common], help="delete it (config.toml applies)")
    p.set_defaults(func=cmd_config)

    u = sub.add_parser("usage", parents=[common], help="usage per app key and day (UTC)")
    u.add_argument("--appkey")
    u.add_argument("--since", type=_date, help="first day, YYYY-MM-DD")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_usage)

    tr = sub.add_parser(
        "transcript", parents=[common], help="a session's transcript, or a key's list"
    )
    tr.add_argument("task_id", nargs="?")
    tr.add_argument("--appkey", help="without TASK_ID: list this key's transcripts")
    tr.add_argument("--since", type=_date, help="first day, YYYY-MM-DD (with --appkey)")
    tr.add_argument(
        "--limit", type=_positive, help=f"at most this many (default {TRANSCRIPTS_LIMIT})"
    )
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_transcript)
