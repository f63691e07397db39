"""MoE routers: discovery, capture, replay, freezing, the experts forward, router policy."""
