"""Backends turn graphs into code. The graph code never imports a backend."""
