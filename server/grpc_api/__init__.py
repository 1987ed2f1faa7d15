"""gRPC adapter: proto in, service call, proto out; status mapping in one place."""
