"""The ``nwc`` command-line tool."""
