"""Serving: the OpenAI protocol, server, metrics, client, workloads, load generator, router (notebook 02)."""
