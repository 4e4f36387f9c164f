"""The OCI runtime-spec model: typed access to what the allocator reads and writes."""
