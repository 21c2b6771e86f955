"""The network in its roles (student, trained teacher, passive teacher): loading, snapshots, packing."""
