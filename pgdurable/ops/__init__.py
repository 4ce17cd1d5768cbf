"""Operations: the ``pgdurable`` command line."""
