"""The backend side: sending a request to llama-server and reading its answer. The send
in layers (:mod:`gateway.backends.send`), backends and their replicas
(:mod:`gateway.backends.upstream`), admission and its queue's order, the host-wide slot
table that keeps tenants' KV caches apart, and the request path's HTTP client."""
