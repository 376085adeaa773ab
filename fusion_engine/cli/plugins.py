"""The ``plugins`` command: what the installed plugins register, and a record's parameters."""

from __future__ import annotations

import difflib
import json
import sys

from ..errors import FusionEngineError
from .output import print_table


def add_plugins_parser(sub) -> None:
    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--spec", metavar="SPEC", help="also load the plugin files this spec lists")
    plugins.add_argument("--params", metavar="NAME",
                         help="the parameters of the backbone, fuser, dataset or executor NAME, with defaults")


def cmd_plugins(args) -> int:
    from ..plugins import get_plugins

    if args.spec:
        from ..resolve import prepare

        _, plugins = prepare(args.spec)
    else:
        plugins = get_plugins()
    if args.params:
        return _plugin_params(plugins, args.params, as_json=args.json)
    rows = plugins.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print_table(["plugin", "version", "source", "hooks"],
                [[row["name"], row["version"] or "", row["distribution"] or row["path"] or "", ", ".join(row["hooks"])]
                 for row in rows], title="plugins")
    print_table(["kind", "name", "plugin", "description"],
                [[r["kind"], r["name"], row["name"], r["description"]] for row in rows for r in row["records"]],
                title="what they register (fusion-engine plugins --params NAME: a record's parameters)")
    for name, why in plugins.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


def _plugin_params(plugins, name: str, *, as_json: bool) -> int:
    from ..jsoncodec import encode_json
    from ..plugins import describe_params

    catalog = plugins.catalog()
    found = catalog.named(name)
    if not found:
        every = sorted({r.record.name for kind in catalog.records.values() for r in kind.values()})
        close = difflib.get_close_matches(name, every, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FusionEngineError(f"no plugin registers '{name}'{hint}; `fusion-engine plugins` lists them")
    described = [{"kind": kind, "name": p.record.name, "plugin": p.plugin, "description": p.record.description,
                  "params": describe_params(p.record.params) if getattr(p.record, "params", None) else []}
                 for kind, p in found]
    if as_json:
        print(encode_json(described, indent=2, fallback=str))
        return 0
    for item in described:
        title = f"{item['kind']} {item['name']} ({item['plugin']}): {item['description']}"
        if not item["params"]:
            print(f"{title}\n  no parameters")
            continue
        print_table(["param", "type", "default", "constraints", "description"],
                    [[f["name"], f["type"], encode_json(f["default"], fallback=str), ", ".join(f["constraints"]),
                      f["description"]] for f in item["params"]], title=title)
    return 0
