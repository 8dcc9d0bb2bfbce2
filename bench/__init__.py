"""The snapfs benchmark (issue 4): `scripts/bench` runs `python -m bench`. Not part of the
snapfs package; see bench/__main__.py for the figures."""
