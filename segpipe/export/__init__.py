"""Deployable bundles: writing, reading and validating them, and loading their network per runtime."""
