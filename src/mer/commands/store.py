"""`mer store WHAT`: operations on stores; each module declares its own options."""

COMMANDS = {
    "split": ("mer.cluster.split", "write one shard store per cluster worker"),
}
