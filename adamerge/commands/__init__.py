"""The ``adamerge`` command line: :mod:`~adamerge.commands.main` dispatches to one module per
command (fit/validate/test, demo, compare, export, convert, finetune, bench), each imported
only when it runs.

May import anything in the package; nothing imports it (but the top-level ``__main__``).
"""
