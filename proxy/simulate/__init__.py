"""`lmswitch simulate`: traces of requests (`trace`), made up (`generate`) or read from the
proxy's own JSON log (`fromlog`), replayed through the real scheduler in virtual time (`replay`)
and reported side by side (`report`). docs/design.md §7 describes the trace format."""
