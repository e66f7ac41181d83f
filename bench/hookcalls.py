"""The hook calls of one request, in-process: what the pipeline's dispatch costs.

A pipeline shaped like pipelines.yaml's (8 plugins, the hooks each built-in implements,
19 implementations, bodies that do nothing) gets one plain request's hook calls
(request_start, request, route, upstream_request, response, complete), three ways:

* ``Pipeline``: the gateway's own methods, pluggy's ``_multicall`` through the
  manager's ``_hookexec`` with each hook's implementations taken once;
* ``HookCaller``: ``pm.hook.<name>(**kwargs)``, pluggy's public call, which re-checks
  the arguments and copies the implementations on every call;
* ``direct``: each implementation called by hand in pluggy's order, no dispatch at
  all (the floor).

    python bench/hookcalls.py [--rounds 7] [--requests 20000]

Prints CPU microseconds per request, the best of the rounds; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.context import RequestContext  # noqa: E402
from gateway.hookspecs import GatewaySpec, hookimpl  # noqa: E402
from gateway.pipeline import Pipeline  # noqa: E402

SHAPE = {"prometheus": ["request", "complete"], "statsd": ["request_start", "upstream_request", "complete"],
         "accesslog": ["response", "response_event", "complete"], "auth": ["request_start", "request"],
         "validate": ["request", "upstream_request"], "cache": ["request", "response", "response_event", "complete"],
         "ratelimit": ["request", "complete"], "router": ["route", "upstream_request", "complete"]}
CALLS = [("request_start", {}), ("request", {"backends": {}}), ("route", {"backends": {}}),
         ("upstream_request", {"payload": {}}), ("response", {"body": {}}),
         ("complete", {"outcome": "ok", "backends": {}})]


def plugin(hooks: list[str]) -> object:
    """A plugin implementing ``hooks`` with the spec's arguments, doing nothing."""
    namespace: dict = {}
    for hook in hooks:
        code = getattr(GatewaySpec, hook).__code__
        exec(f"def {hook}({', '.join(code.co_varnames[:code.co_argcount])}): return None", namespace)
    return type("Plugin", (), {hook: hookimpl(namespace[hook]) for hook in hooks})()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    pipeline = Pipeline("bench", [(name, plugin(hooks)) for name, hooks in SHAPE.items()])
    ctx = RequestContext(request_id="bench", method="POST", route="/v1/chat/completions")
    hooks = {name: getattr(pipeline.pm.hook, name) for name, _ in CALLS}
    direct_plan = [(kwargs, [(impl.function, impl.argnames) for impl in reversed(hooks[name].get_hookimpls())])
                   for name, kwargs in CALLS]

    def gateway_pipeline() -> None:
        pipeline.request_start(ctx)
        pipeline.request(ctx, {})
        pipeline.route(ctx, {})
        pipeline.upstream_request(ctx, {})
        pipeline.response(ctx, {})
        pipeline.complete(ctx, "ok", {})

    def hook_caller() -> None:
        for name, kwargs in CALLS:
            hooks[name](ctx=ctx, **kwargs)

    def direct() -> None:
        for kwargs, impls in direct_plan:
            call = {"ctx": ctx, **kwargs}
            for function, argnames in impls:
                function(*[call[name] for name in argnames])

    ways = {"Pipeline (pluggy _multicall via _hookexec)": gateway_pipeline,
            "HookCaller (pm.hook.<name>(...))": hook_caller, "direct (no dispatch)": direct}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(args.rounds):
        for label, way in ways.items():
            start = time.process_time()
            for _ in range(args.requests):
                way()
            best[label] = min(best[label], (time.process_time() - start) / args.requests * 1e6)
    for label, micros in best.items():
        print(f"{label:45s} {micros:6.1f} us CPU per request")


if __name__ == "__main__":
    main()
