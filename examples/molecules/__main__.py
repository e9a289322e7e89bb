"""Entry point of `python -m examples.molecules`."""

import warnings

# torch_geometric 2.8.1 calls torch.jit.script at import, and torch 2.14 marks that as deprecated
# with a FutureWarning. The filter must be set before .main imports torch_geometric.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")

from .main import main  # noqa: E402

if __name__ == "__main__":
    main()
