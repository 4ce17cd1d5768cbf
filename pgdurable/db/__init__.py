"""The database layer: named queries rendered for a schema, and the migrations."""
