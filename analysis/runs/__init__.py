"""Runs on disk: schema, table writer, reader, the build pipeline, layouts and autoencoder."""
