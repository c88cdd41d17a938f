"""What every Cornucopia service shares: configuration, logging, telemetry,
the gRPC edge, authentication, errors, the database, the bus, the outbox and
the inbox. A service folder holds only its own rules, tables and handlers."""
