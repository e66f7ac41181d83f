"""The commands that say what can be set: ``plugins`` (each plugin's hooks and fields) and
``settings`` (every setting from the environment)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import settings
from ..config import ConfigError, load_config
from ..pipeline import discover
from ..redact import redact_url
from .registry import arg, command


@command("plugins", "list the plugins that can be used",
         arg("--config", default=None, help="also the drop-ins of this file's plugin_dirs"))
def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        plugin_dirs = load_config(args.config).plugin_dirs if args.config else ()
        available = discover(plugin_dirs)
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
        return 1
    for spec in available.values():
        print(f"{spec.name}  ({spec.source})  hooks: {', '.join(spec.hooks)}")
        for field, prop in spec.schema.get("properties", {}).items():
            default = f" [default {json.dumps(prop['default'])}]" if "default" in prop else ""
            print(f"    {field}: {prop.get('description', '')}{default}")
    return 0


# checks_settings=False: it shows the bad values, and says why, instead of refusing them
@command("settings", "every setting from the environment: value, default, description", checks_settings=False)
def cmd_settings(args: argparse.Namespace) -> int:
    return settings.print_settings()
