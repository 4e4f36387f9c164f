"""Running containers in a utility VM: specs for people, the container lifecycle, pods."""
