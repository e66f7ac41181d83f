"""Process-wide lifecycle state shared by the worker and the app.

It imports nothing: the gunicorn master imports the worker class (and so this
module) before the worker patches the standard library for gevent.
"""

# Set by the worker on SIGTERM: new requests get 503 while those in flight finish.
draining = False

# The text of the last pipelines file the master checked and found good; a worker
# that finds the file bad after a reload serves this instead.
last_good_config: str | None = None

# The environ key by which the app (body.py) lets the worker (worker.linger) discard more
# of a body it refused by size after accepting the request: (bytes, seconds).
DISCARD_ALLOWANCE = "llamagate.discard_allowance"
