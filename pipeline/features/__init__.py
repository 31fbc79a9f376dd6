"""The teacher feature store: its on-disk format, the reader, the caching plan, low-rank bases, the cache engine."""
