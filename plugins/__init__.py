"""Plugins: users' methods and datasets, registered with the built-ins' decorators.

``plugins.registry``: the one ``Registry`` behind ``METHODS`` and ``DATASETS``.
``plugins.loader``: loads a grid's ``plugins:`` entries and the ``adgrid.methods`` /
``adgrid.datasets`` entry points, checks their contract, and reloads them on Ray workers.
"""
