"""Interoperation with the published Patch Diffusion and EDM code: reading its network snapshots
safely (published.py), mapping them onto our networks (convert.py) and writing them as patchdiff
snapshots (snapshot.py)."""
