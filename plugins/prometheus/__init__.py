"""prometheus: the gateway's metrics, and every replica's llama-server metrics, for a
Prometheus scrape at ``path`` (``/metrics``).

Put it in every pipeline whose requests should be counted; route ``path`` to a pipeline
that has it (``routes: {/metrics: {pipeline: ...}}``): the instance there answers the
scrape. Only an admin key, or a scraper whose address is in ``allow_from``, gets the
metrics; anyone else gets 403 (a pipeline with auth in front answers 401 first).

Several gunicorn workers count into one set of numbers through ``prometheus_client``'s
multiprocess mode: gunicorn.conf.py gives the workers a shared directory
(``PROMETHEUS_MULTIPROC_DIR``) and removes a dead worker's live gauges, so a scrape
answered by any worker shows the sums of all of them; counters of workers that exited
stay counted. Without that directory (one process, tests) a process registry is used.

The scrape also asks each replica's own ``/metrics`` (llama-server started with
``--metrics``) and merges them, every sample labelled with its ``backend`` and
``replica``; ``llamagate_replica_metrics_up`` tells which answered. Nothing here runs
on a request's path but one dictionary lookup per label set and a few additions.
"""

from __future__ import annotations

import ipaddress
import os
import re
import threading
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.plugin import PermissionDeniedError, Response, cached_tokens, current_settings, hookimpl

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)

# Defined once per process: every instance (one per pipeline) counts into the same series.
REQUESTS = Counter("llamagate_requests", "Requests answered, by route, model and HTTP status.",
                   ["route", "model", "status"])
LATENCY = Histogram("llamagate_request_duration_seconds", "Arrival to last byte, by route.", ["route"],
                    buckets=LATENCY_BUCKETS)
TTFB = Histogram("llamagate_time_to_first_byte_seconds", "Arrival to first body byte of successful answers, "
                 "by model.", ["model"], buckets=LATENCY_BUCKETS)
QUEUE_WAIT = Histogram("llamagate_queue_wait_seconds", "Time waited for a backend slot, by backend.", ["backend"],
                       buckets=QUEUE_BUCKETS)
TOKENS = Counter("llamagate_tokens", "Tokens by model and kind (prompt, completion, and cached: the prompt tokens "
                 "llama-server took from the slot's KV cache), streams left early included.", ["model", "kind"])
KV_STATE = Histogram("llamagate_kv_state_seconds", "Saved KV states: the time of a request's slot saves and "
                     "restores, by action (save, restore); their counts and bytes are events kv.*.", ["action"],
                     buckets=QUEUE_BUCKETS)
CACHE = Counter("llamagate_cache_lookups", "Cache lookups by result (hit, miss).", ["result"])
REFUSED = Counter("llamagate_ratelimit_refusals", "Requests refused by a rate limit (429).")
UPSTREAM_ERRORS = Counter("llamagate_upstream_errors", "5xx answers of requests that reached a backend.",
                          ["backend"])
EVENTS = Counter("llamagate_events", "Events plugins and the core count (upstream.retries, config.reloaded, "
                 "config.reload_failed, ratelimit.store_unavailable, ...), by name.", ["name"])
IN_FLIGHT = Gauge("llamagate_backend_in_flight", "Requests admitted to a backend, all workers.", ["backend"],
                  multiprocess_mode="livesum")
QUEUED = Gauge("llamagate_backend_queued", "Requests waiting for a backend slot, all workers.", ["backend"],
               multiprocess_mode="livesum")
BREAKER_OPEN = Gauge("llamagate_replica_breaker_open", "1 while a replica's circuit breaker is open or "
                     "half open (the highest of the workers' views).", ["backend", "replica"],
                     multiprocess_mode="livemax")

# This process's children of the metrics above, by label values: ``labels()`` takes a lock
# and builds its key on every call (~1.5 µs; a request touches a dozen label sets).
_children: dict[tuple[Any, ...], Any] = {}
# The value this process last wrote to each live gauge's child: a write is a locked mmap
# write, and most gauges (queued, breakers, an idle backend's in flight) rarely change.
# A forked child starts with its own file (prometheus_client's), so with nothing written.
_written: dict[Any, float] = {}
os.register_at_fork(after_in_child=_written.clear)


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once per label set."""
    found = _children.get((metric, *values))
    if found is None:
        found = _children[(metric, *values)] = metric.labels(*values)
    return found


def set_gauge(metric: Any, value: float, *values: str) -> None:
    """``metric.labels(*values).set(value)``, skipped when that is already its value."""
    gauge = child(metric, *values)
    if _written.get(gauge) != value:
        gauge.set(value)
        _written[gauge] = value


_FAMILY = re.compile(r"^# (?:HELP|TYPE) (\S+)")
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def registry() -> CollectorRegistry:
    """What a scrape reads: every worker's numbers, or this process's alone."""
    if current_settings().metrics_dir:
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    from prometheus_client import REGISTRY
    return REGISTRY


def label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def relabel(text: str, labels: Mapping[str, str]) -> dict[str, list[str]]:
    """A replica's exposition, each sample given ``labels``: ``{family: [lines]}`` with
    its ``# HELP``/``# TYPE`` lines first, so families from several replicas can be
    written together (the format wants a family's lines in one block)."""
    extra = ",".join(f'{name}="{label_value(value)}"' for name, value in labels.items())
    families: dict[str, list[str]] = {}
    for line in text.splitlines():
        header = _FAMILY.match(line)
        if header:
            families.setdefault(header.group(1), []).append(line)
            continue
        sample = _SAMPLE.match(line)
        if not sample or line.startswith("#"):
            continue
        name, existing, rest = sample.groups()
        inner = existing[1:-1] + "," + extra if existing and existing != "{}" else extra
        family = next((f for f in families if name == f or name.startswith(f + "_")), name)
        families.setdefault(family, []).append(f"{name}{{{inner}}}{rest}")
    return families


def merge(expositions: Iterable[dict[str, list[str]]]) -> str:
    """Families from several replicas, each family's header once, its samples together."""
    merged: dict[str, list[str]] = {}
    for families in expositions:
        for family, lines in families.items():
            kept = merged.setdefault(family, [])
            kept.extend(line for line in lines if not (line.startswith("#") and line in kept))
    return "".join(line + "\n" for lines in merged.values() for line in lines)


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.path = config["path"]
        self.allow_from = [ipaddress.ip_network(cidr, strict=False) for cidr in config["allow_from"]]
        self.scrape_replicas = config["scrape_replicas"]
        self.replica_timeout = config["replica_timeout"]

    # --- counting ----------------------------------------------------------------------

    @hookimpl
    def complete(self, ctx, outcome, backends):
        if ctx.route == self.path:
            return  # scrapes are not traffic
        model = ctx.model or "none"
        child(REQUESTS, ctx.route, model, str(ctx.status)).inc()
        child(LATENCY, ctx.route).observe(ctx.latency_ms / 1000.0)
        if ctx.ttfb_ms is not None and ctx.model and outcome == "ok":
            child(TTFB, model).observe(ctx.ttfb_ms / 1000.0)
        usage = ctx.usage or {}
        for kind in ("prompt", "completion"):
            count = usage.get(f"{kind}_tokens")
            if isinstance(count, int) and count > 0:
                child(TOKENS, model, kind).inc(count)
        cached = cached_tokens(usage)
        if cached:
            child(TOKENS, model, "cached").inc(cached)
        if ctx.cache in ("HIT", "MISS"):
            child(CACHE, ctx.cache.lower()).inc()
        error = ctx.error
        if error is not None and error.status == 429:
            REFUSED.inc()
        if error is not None and error.status >= 500 and ctx.backend is not None and ctx.sent:
            child(UPSTREAM_ERRORS, ctx.backend).inc()
        for name, count in ctx.counters.items():
            child(EVENTS, name).inc(count)
        for name, ms in ctx.timings.items():
            if name.startswith("queue."):
                child(QUEUE_WAIT, name[6:]).observe(ms / 1000.0)
            elif name in ("kv.save", "kv.restore"):
                child(KV_STATE, name[3:]).observe(ms / 1000.0)
        for name, backend in backends.items():  # this worker's share of the live gauges
            set_gauge(IN_FLIGHT, backend.in_flight, name)
            set_gauge(QUEUED, backend.queued, name)
            for replica in backend.replicas:
                set_gauge(BREAKER_OPEN, 0 if replica.breaker == "closed" else 1, name, replica.url)

    # --- the scrape ----------------------------------------------------------------------

    @hookimpl
    def request(self, ctx, backends):
        if ctx.route != self.path:
            return None
        # here, not in request_start: an auth plugin anywhere in the pipeline has named the caller
        principal = ctx.principal
        if not (principal is not None and principal.role == "admin") and not self._allowed(ctx.remote_addr):
            raise PermissionDeniedError("The metrics are for an admin key or an allowed scraper address.",
                                        code="metrics_forbidden")
        text = generate_latest(registry()).decode()
        if self.scrape_replicas and backends:
            text += self._replicas(backends)
        return Response(content=text.encode(), content_type=CONTENT_TYPE_LATEST)

    def _allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.allow_from)

    def _replicas(self, backends: Mapping[str, Any]) -> str:
        """Every replica's own ``/metrics``, asked at once, merged and labelled."""
        replicas = [(name, replica) for name, backend in backends.items() for replica in backend.replicas]
        answers: dict[int, str | None] = {}

        def ask(i: int, replica: Any) -> None:
            try:
                resp = replica.fetch("/metrics", timeout=self.replica_timeout)
                answers[i] = resp.text if resp.status_code == 200 else None
            except Exception:  # a replica that is down, slow or without --metrics: up 0
                answers[i] = None

        threads = [threading.Thread(target=ask, args=(i, replica), daemon=True) for i, (_, replica) in
                   enumerate(replicas)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(self.replica_timeout + 1)
        up = ["# HELP llamagate_replica_metrics_up 1 when the replica's own /metrics answered this scrape.",
              "# TYPE llamagate_replica_metrics_up gauge"]
        expositions = []
        for i, (name, replica) in enumerate(replicas):
            text = answers.get(i)
            labels = {"backend": name, "replica": replica.url}
            up.append(f'llamagate_replica_metrics_up{{backend="{label_value(name)}",'
                      f'replica="{label_value(replica.url)}"}} {0 if text is None else 1}')
            if text is not None:
                expositions.append(relabel(text, labels))
        return "\n".join(up) + "\n" + merge(expositions)
