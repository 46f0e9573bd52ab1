"""Deployment-side tooling: the model declaration, rendering, local mode, AWS operations."""
