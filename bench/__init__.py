"""Benchmark harness for dbkernels: `python -m bench <suite>` and `python -m bench report`.

See bench/__main__.py for the command line, bench/common.py for how things are
measured and the row schema, bench/report.py for the markdown/PNG report.
"""
