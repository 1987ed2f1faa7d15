"""Persistence backends behind the ports in `server.ports`, chosen by database URL."""
