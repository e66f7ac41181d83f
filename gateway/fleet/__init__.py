"""The fleet: llama-servers the gateway launches, shares, swaps, unloads and restarts
itself (docs/fleet.md).

- ``spec.py`` — what a launched backend costs (the memory estimate) and the checks
  ``llamagate check`` adds for launched backends.
- ``supervisor.py`` — the one process per host, started by gunicorn's master, that owns
  the llama-server processes: ``states.py`` (one model's state machine and its transition
  table), ``scheduler.py`` (when each starts and stops), ``server.py`` (the Unix socket of
  leases), ``processes.py`` (launching one llama-server, ``/health``).
- ``client.py`` — the workers' side: leases on a model for a request, operator calls.
- ``master.py`` — gunicorn's master starting and stopping the supervisor.
"""
