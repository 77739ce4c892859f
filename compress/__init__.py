"""compress: a trained Hugging Face model in, an edge-ready model and report cards out.

The library never imports Prefect; `flows/` wires these stages into a flow.
"""

__version__ = "0.1.0"
