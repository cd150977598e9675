"""Removing channels: structured masks, the channel dependency graph, physical compaction and
fine-pruning's pieces."""
