"""The benchmark suite: figures measured next to this machine's ceilings (``make bench``)."""
