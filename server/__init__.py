"""KeyBinder server: gRPC adapter, service layer, challenges, stores, certificates, config and CLI."""
