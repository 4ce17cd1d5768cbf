"""The runtime: the supervisor, its worker processes and their components, the maintenance
sweeps, configuration and systemd."""
