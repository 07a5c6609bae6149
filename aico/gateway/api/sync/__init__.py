"""The sync data API: ``/api/v1/sync/collections/{name}/items[/{key}]`` (docs/sync.md)."""
