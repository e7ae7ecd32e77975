"""jobs: the nrm-ood command line, the Ray Data scoring pipeline, storage and run manifests."""

__version__ = "0.1.0"
