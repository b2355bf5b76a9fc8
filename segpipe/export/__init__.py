"""Writing deployable bundles: the bundle folder, each format's files, and their check against Keras."""
