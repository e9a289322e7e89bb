"""Learn PT task weights for a molecular GIN with metaopt (B3DB blood-brain-barrier FT).

Run `python -m examples.molecules --help` from the repository root. The submodules are not
imported here, so that `python -m` can set warning filters before torch_geometric loads.
"""

__all__: list[str] = []
