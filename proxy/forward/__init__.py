"""The forwarder: routing, headers, bodies, replay. It knows nothing about vendors."""
