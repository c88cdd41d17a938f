"""The notify service: the one place that talks to members."""
