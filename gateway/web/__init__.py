"""The HTTP side: what gunicorn runs, the Falcon app and its resources, and one request's
life from its headers to its ``complete`` hooks (:mod:`gateway.web.flow`, through its
:mod:`gateway.web.exchange`), with the configuration in force (:mod:`gateway.web.state`)
and its reloads."""
