"""Persistence and sharing: what outlives a request or a worker. Byte caches and rate
limits (memory or Redis), the Redis link every worker and host shares, keys files, and
PostgreSQL's keys table and usage ledger."""
