"""noduledet: lung-nodule detection in chest CT with channel-coordinate fusion attention."""

__version__ = "0.1.0"
