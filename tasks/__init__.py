"""The task layer: the wire schema, the error tree with its wire codes, the interface a handler may
use, the jobs the device works on, and one module per task type (listed in ``supported``).

Below it, ``storage`` and ``air_registry`` know nothing of the wire; above it, ``server`` carries
tasks in and results out. ``inputs`` is where the ground floors' errors become error items.
"""
