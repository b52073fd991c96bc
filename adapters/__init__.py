"""Registry adapters, one package each, found through the discoveryd.adapters entry points."""
