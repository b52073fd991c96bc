"""Small helpers every adapter may import: names, addresses, source locations.

- `names`: DNS names and Kubernetes names (one set of rules, with the
  variations registries need: case, `_`, a trailing dot).
- `hostport`: `host:port`, `[v6]:port` and `scheme://host:port` parsing.
- `location`: field paths (`spec.ports[1].name`) and YAML node → line.
- `backoff`: the one rule for the `backoff_initial`/`backoff_max` keys.
- `sync`: a full sync's `replace`, in steps with the index's writers (`replace_all`).

The session loop (connect → sync → follow with backoff) is
`discoveryd.session`, shared with the supervisor. Pure functions (and
`replace_all`, which only writes to the shard it is given); no I/O.
"""
